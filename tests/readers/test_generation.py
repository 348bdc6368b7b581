"""Continuous batching: rows that join a running batch or leave it decode exactly as they would alone."""

import itertools

import pytest

from cepe_rag.readers import ConcatReader, GenerationConfig, ParallelReader
from cepe_rag.types import Passage
from tests.readers.conftest import tiny_chat_llama
from tests.readers.test_readers import tiny_cepe_reader

PASSAGES = [Passage(i, f"Passage {i} tells that topic {i} is {'large' if i % 2 else 'small'}.", f"T{i}")
            for i in range(12)]
REQUESTS = [("Is topic 1 large?", PASSAGES[:3], 5), ("What about topic 4, and topic 7 too?", PASSAGES[3:8], 9),
            ("Topic 9?", PASSAGES[8:10], 7), ("And the last one, topic 11?", PASSAGES[10:], 6)]


@pytest.fixture(scope="module")
def tiny_model(chat_tokenizer):
    return tiny_chat_llama(chat_tokenizer).double()


@pytest.fixture(params=["concat", "parallel", "cepe", "cepe-mixed-kv"])
def reader(request, tiny_model, chat_tokenizer):
    config = GenerationConfig(max_new_tokens=9)
    if request.param == "concat":
        return ConcatReader(tiny_model, chat_tokenizer, generation=config)
    if request.param == "parallel":
        return ParallelReader(tiny_model, chat_tokenizer, generation=config)
    cepe = tiny_cepe_reader(tiny_model, chat_tokenizer, "copy")
    cepe.model.double()
    if request.param == "cepe-mixed-kv":  # requests alternately cache and absorb their K/V; joins mix the two
        modes = itertools.cycle(["cache", "absorb"])
        cepe.cross_kv_mode = lambda states: next(modes)
    return cepe


def decode_alone(reader, question, passages, limit) -> tuple[str, int]:
    batch = reader.start([reader.prepare(question, passages)], reader.generation, limits=[limit])
    text = "".join(deltas[0] for deltas in batch.stream())
    return text, batch.steps[0]


def test_rows_that_join_and_leave_a_running_batch_decode_as_they_would_alone(reader):
    alone = [decode_alone(reader, q, ps, limit) for q, ps, limit in REQUESTS]
    prepared = [reader.prepare(q, ps) for q, ps, _ in REQUESTS]
    limits = [limit for _, _, limit in REQUESTS]
    running = reader.start(prepared[:2], reader.generation, limits=limits[:2])
    rows, texts = [0, 1], {i: "" for i in range(len(REQUESTS))}
    waiting = [2, 3]
    steps_taken = 0
    while rows or waiting:
        if waiting and steps_taken in (2, 4):  # a newcomer joins after its own first step (its prefill)
            newcomer = waiting.pop(0)
            joining = reader.start([prepared[newcomer]], reader.generation, limits=[limits[newcomer]])
            texts[newcomer] += joining.step()[0]
            running.join(joining)
            rows.append(newcomer)
        deltas = running.step()
        steps_taken += 1
        for row, delta in zip(rows, deltas):
            texts[row] += delta
        still = [position for position, done in enumerate(running.done) if not done]
        if len(still) < len(rows):  # finished rows leave: the next steps compute only the others
            running.keep(still)
            rows = [rows[position] for position in still]
    assert [texts[i] for i in range(len(REQUESTS))] == [text for text, _ in alone]
    assert all(steps == limit for (_, steps), (_, _, limit) in zip(alone, REQUESTS))


def test_a_row_that_ends_early_reports_why(tiny_model, chat_tokenizer):
    reader = ConcatReader(tiny_model, chat_tokenizer, generation=GenerationConfig(max_new_tokens=3))
    batch = reader.start([reader.prepare("q?", PASSAGES[:1])], reader.generation)
    list(batch.stream())
    assert batch.done == [True] and batch.steps == [3] and batch.out_of_tokens == [True]
    with pytest.raises(ValueError):
        fresh = reader.start([reader.prepare("q?", PASSAGES[:1])], reader.generation)
        batch.join(fresh)  # not prefilled yet: its prompt is not in its cache
