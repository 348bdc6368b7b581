"""Exactness of the training-free parallel reader on a tiny random decoder (float64)."""

import pytest
import torch

from cepe_rag.readers import ConcatReader, GenerationConfig, ParallelReader
from cepe_rag.types import Passage
from tests.readers.conftest import tiny_chat_llama

PASSAGES = [Passage(i, f"Passage {i} is about subject {i * 7} and more words {'x' * i}.", f"T{i}") for i in range(6)]


@pytest.fixture(scope="module")
def tiny_model(chat_tokenizer):
    return tiny_chat_llama(chat_tokenizer, max_position_embeddings=1024).double()


def reader_for(model, tokenizer, **kwargs):
    return ParallelReader(model, tokenizer, generation=GenerationConfig(max_new_tokens=8), **kwargs)


def query_logits(reader, question, passages):
    """Logits of the question tokens attending to the parallel passage caches."""
    prepared = reader.prepare(question, passages)
    cache, past_mask, offsets, context = reader.parallel_cache([prepared])
    query = prepared.ids
    positions = torch.arange(len(query))[None] + offsets[:, None]
    mask = torch.cat([past_mask, torch.ones((1, len(query)), dtype=torch.long)], dim=-1)
    with torch.inference_mode():
        return reader.model(input_ids=torch.tensor([query]), attention_mask=mask, position_ids=positions,
                            cache=cache, use_cache=True, parallel_context=context).logits


def test_one_passage_equals_concatenation_in_the_same_position(tiny_model, chat_tokenizer):
    reader = reader_for(tiny_model, chat_tokenizer)  # default knobs: they act only from two passages on
    prefix, chunks, query = reader.pieces("What is subject 7?", PASSAGES[1:2])
    with torch.inference_mode():
        sequential = tiny_model(input_ids=torch.tensor([prefix + chunks[0] + query])).logits[:, -len(query):]
    torch.testing.assert_close(query_logits(reader, "What is subject 7?", PASSAGES[1:2]), sequential,
                               rtol=0, atol=1e-10)
    # The real chat prompt, token for token: both readers tokenize the same three pieces.
    concat = ConcatReader(tiny_model, chat_tokenizer, generation=GenerationConfig(max_new_tokens=8))
    assert concat.prepare("What is subject 7?", PASSAGES[1:2]).ids == prefix + chunks[0] + query
    assert reader.answer("What is subject 7?", PASSAGES[1:2]).text == \
        concat.answer("What is subject 7?", PASSAGES[1:2]).text


def test_passage_order_does_not_change_the_output(tiny_model, chat_tokenizer):
    reader = reader_for(tiny_model, chat_tokenizer, ape_temperature=0.8, ape_scale=1.2)
    forward = query_logits(reader, "q?", PASSAGES)
    backward = query_logits(reader, "q?", PASSAGES[::-1])
    torch.testing.assert_close(forward, backward, rtol=0, atol=1e-10)
    assert reader.answer("q?", PASSAGES).text == reader.answer("q?", PASSAGES[::-1]).text


def test_batched_questions_answer_like_single_ones(tiny_model, chat_tokenizer):
    reader = reader_for(tiny_model, chat_tokenizer)
    questions = ["first?", "a much longer second question with more tokens?", "third"]
    passages = [PASSAGES[:2], PASSAGES[2:6], PASSAGES[5:6]]
    batch = reader.answer_batch(questions, passages)
    assert [a.text for a in batch] == [reader.answer(q, p).text for q, p in zip(questions, passages)]


def test_ape_knobs_change_attention_and_neutral_knobs_equal_sdpa(tiny_model, chat_tokenizer):
    neutral = query_logits(reader_for(tiny_model, chat_tokenizer, ape_scale=1.0), "q?", PASSAGES[:3])
    sharper = query_logits(reader_for(tiny_model, chat_tokenizer, ape_temperature=0.5), "q?", PASSAGES[:3])
    scaled = query_logits(reader_for(tiny_model, chat_tokenizer, ape_scale=0.5), "q?", PASSAGES[:3])
    assert (neutral - sharper).abs().max() > 1e-6 and (neutral - scaled).abs().max() > 1e-6
    # Without a ParallelContext the registered attention is plain SDPA: the model's logits are unchanged.
    ids = torch.tensor([chat_tokenizer("plain text")["input_ids"]])
    with torch.inference_mode():
        via_parallel_impl = tiny_model(input_ids=ids).logits
        tiny_model.config._attn_implementation = "sdpa"
        via_sdpa = tiny_model(input_ids=ids).logits
    assert torch.equal(via_parallel_impl, via_sdpa)
