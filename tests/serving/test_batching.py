"""The batcher answers each row as soon as it ends, not when its whole batch ends."""

import asyncio
import time

from cepe_rag.readers import GenerationConfig
from cepe_rag.readers.generation import StepDeltas
from cepe_rag.serving.batching import Batcher, Job


class ScriptedBatch:
    """Row 0 ends after one step; row 1 writes a word every step until its limit of five, slowly."""

    def __init__(self, limits):
        self.limits, self.steps = list(limits), [0] * len(limits)
        self.done, self.out_of_tokens, self.rows = [False] * len(limits), [False] * len(limits), [0, 1]

    def step(self):
        time.sleep(0.05)
        deltas = []
        for index, row in enumerate(self.rows):
            self.steps[index] += 1
            deltas.append("done" if row == 0 else f"w{self.steps[index] - 1} ")
            self.done[index] = row == 0 or self.steps[index] >= self.limits[index]
            self.out_of_tokens[index] = row == 1 and self.done[index]
        return StepDeltas(deltas, self.done)

    def keep(self, rows):
        for name in ("limits", "steps", "done", "out_of_tokens", "rows"):
            setattr(self, name, [getattr(self, name)[i] for i in rows])


class ScriptedReader:
    system_prompt = None
    generation = GenerationConfig()

    class tokenizer:  # noqa: N801 -- stands in for a tokenizer object
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    tokenizer = tokenizer()

    def prepare_request(self, question, passages, conversation=None):
        from cepe_rag.readers.base import PreparedPrompt

        return PreparedPrompt([1, 2, 3], list(passages))

    def start(self, prepared, config, limits=None):
        return ScriptedBatch(limits)


def test_a_row_that_ends_is_answered_before_its_batch_ends():
    async def scenario():
        batcher = Batcher({"scripted": ScriptedReader()}, max_batch=2, window_s=0.05)
        batcher.start()
        loop = asyncio.get_running_loop()
        jobs = [Job(reader="scripted", question=f"q{i}", passages=[], generation=GenerationConfig(max_new_tokens=5),
                    loop=loop) for i in range(2)]
        for job in jobs:
            batcher.submit(job)
        ended_at = {}
        async def follow(index):
            while (event := await jobs[index].events.get())[0] != "end":
                pass
            ended_at[index] = time.monotonic()
            return event
        first, second = await asyncio.gather(follow(0), follow(1))
        batcher.stop()
        return first, second, ended_at, jobs

    first, second, ended_at, jobs = asyncio.run(scenario())
    assert first[1] == "stop" and jobs[0].text == "done"
    assert second[1] == "length" and jobs[1].text == "w0 w1 w2 w3 w4 "
    assert ended_at[1] - ended_at[0] > 0.15  # the short answer ended four steps before the long one
