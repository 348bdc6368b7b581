"""The batcher answers each row as soon as it ends, not when its whole batch ends."""

import asyncio
import time

from cepe_rag.readers import GenerationConfig
from cepe_rag.readers.generation import StepDeltas
from cepe_rag.serving.batching import Batcher, Job


class ScriptedReader:
    """Row 0 ends after one step; row 1 writes a word every step for five steps, slowly."""

    system_prompt = None
    history = ()
    generation = GenerationConfig()

    class tokenizer:  # noqa: N801 -- stands in for a tokenizer object
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    tokenizer = tokenizer()

    def prepare(self, question, passages):
        from cepe_rag.readers.base import PreparedPrompt

        return PreparedPrompt([1, 2, 3], list(passages))

    def stream_prepared(self, prepared, config):
        for step in range(5):
            time.sleep(0.05)
            yield StepDeltas(["done" if step == 0 else "", f"w{step} "], [True, False])


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
