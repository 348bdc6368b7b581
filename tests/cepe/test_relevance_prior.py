"""The relevance prior: each context chunk's share of the cross-attention and copy-pointer softmaxes weighted by a
per-chunk prior (CrossContext.prior), and the cepe reader's prior from the retrieval embedder's cosine."""

import numpy as np
import pytest
import torch

from cepe_rag.cepe.model import group_by_request
from cepe_rag.readers.cepe import RelevancePrior, relevance_log_weights
from cepe_rag.settings import ReaderSpec
from cepe_rag.types import CepeRagError, Passage
from tests.cepe.test_pointer import CHUNKS, pointer_model, prompt_ids


def context(model, chunks_per_request, log_weights=None, cross_kv="cache"):
    flat = [text for chunks in chunks_per_request for text in chunks]
    token_ids = model.tokenize_chunks(flat)
    states = model.encode_token_chunks(token_ids)
    return model.context_from_states(group_by_request(states, chunks_per_request), cross_kv=cross_kv,
                                     token_ids=group_by_request(token_ids, chunks_per_request),
                                     chunk_log_weights=log_weights)


@pytest.mark.parametrize("cross_kv", ["cache", "absorb"])
def test_equal_weights_change_nothing(chat_tokenizer, cross_kv):
    """A softmax does not see a constant added to all its scores: equal weights are no prior."""
    model = pointer_model(chat_tokenizer)
    ids = prompt_ids(chat_tokenizer)
    with torch.no_grad():
        plain = model(input_ids=ids, cross_context=context(model, CHUNKS, cross_kv=cross_kv)).logits
        equal = model(input_ids=ids, cross_context=context(model, CHUNKS, [[-0.7, -0.7], [2.0, 2.0]], cross_kv)).logits
    torch.testing.assert_close(equal, plain, rtol=0, atol=1e-12)


def test_a_prior_on_one_chunk_reads_that_chunk_alone(chat_tokenizer):
    """Weights (1, ~0): the cross-attention and the pointer see the first chunk only, as if it were the whole
    context; a milder prior lands in between."""
    model = pointer_model(chat_tokenizer)
    ids = prompt_ids(chat_tokenizer)
    firsts = [[chunks[0]] for chunks in CHUNKS]
    with torch.no_grad():
        alone = model(input_ids=ids, cross_context=context(model, firsts)).logits
        both = model(input_ids=ids, cross_context=context(model, CHUNKS)).logits
        picked = model(input_ids=ids, cross_context=context(model, CHUNKS, [[0.0, -1e4]] * 2)).logits
        mild = model(input_ids=ids, cross_context=context(model, CHUNKS, [[0.0, -1.0]] * 2)).logits
    torch.testing.assert_close(picked, alone, rtol=0, atol=1e-10)
    assert not torch.allclose(both, alone, atol=1e-6)
    assert (mild - alone).abs().max() < (both - alone).abs().max()


def test_rows_keep_their_prior_when_batches_are_split_and_joined(chat_tokenizer):
    model = pointer_model(chat_tokenizer)
    ids = prompt_ids(chat_tokenizer)
    weighted = context(model, CHUNKS, [[0.0, -3.0], [-2.0, 0.0]])
    with torch.no_grad():
        batched = model(input_ids=ids, cross_context=weighted).logits
        first = weighted.select_rows(torch.tensor([0]))
        second = context(model, [CHUNKS[1]], [[-2.0, 0.0]])
        rejoined = model(input_ids=ids, cross_context=first.join(second)).logits
        single = model(input_ids=ids[1:], cross_context=second).logits
        without = context(model, [CHUNKS[1]])  # a request without a prior joins with weights of 1
        joined = first.join(without)
    torch.testing.assert_close(rejoined, batched, rtol=0, atol=1e-12)
    torch.testing.assert_close(single[0], batched[1], rtol=0, atol=1e-10)
    assert joined.prior is not None and bool((joined.prior[1] == 0).all())


class FakeEmbedder:
    """Unit vectors by keyword: the question points at "bridge" passages."""

    def encode(self, texts, **kwargs):
        rows = [[1.0, 0.0] if "bridge" in t.lower() else [0.6, 0.8] if "river" in t.lower() else [0.0, 1.0]
                for t in texts]
        return np.asarray(rows, dtype=np.float32)


def test_the_readers_prior_is_a_softmax_of_cosine_over_temperature():
    passages = [Passage(1, "A river."), Passage(2, "The bridge."), Passage(3, "A castle.")]
    sharp = relevance_log_weights("Who built the bridge?", passages, 0.05, RelevancePrior(0.05, FakeEmbedder()))
    soft = relevance_log_weights("Who built the bridge?", passages, 1.0, RelevancePrior(1.0, FakeEmbedder()))
    for weights in (sharp, soft):
        assert sum(np.exp(weights)) == pytest.approx(1.0, abs=1e-9)
        assert weights[1] > weights[0] > weights[2]
    assert np.exp(sharp[1]) > 0.99 > np.exp(soft[1])
    assert sharp[1] - sharp[0] == pytest.approx((1.0 - 0.6) / 0.05, rel=1e-5)


def test_the_retrievers_cosine_is_used_when_every_passage_has_one():
    """Retrieved passages carry their cosine to the question (dense_score): nothing is embedded again. One passage
    without it (e.g. a caller's own) and all are embedded, as the index embeds them (title, newline, text)."""

    class Refusing:
        def encode(self, texts, **kwargs):
            raise AssertionError("embedded although the retriever's scores were there")

    scored = [Passage(1, "a", dense_score=0.3), Passage(2, "b", dense_score=0.5)]
    weights = relevance_log_weights("q?", scored, 0.1, RelevancePrior(0.1, Refusing()))
    assert weights[1] - weights[0] == pytest.approx(2.0, rel=1e-9)
    seen = []

    class Recording(FakeEmbedder):
        def encode(self, texts, **kwargs):
            seen.extend(texts)
            return super().encode(texts, **kwargs)

    prior = RelevancePrior(0.1, Recording())
    relevance_log_weights("Which bridge?", [scored[0], Passage(3, "The bridge.", title="Bridge")], 0.1, prior)
    assert seen == ["Which bridge?", "a", "Bridge\nThe bridge."]
    relevance_log_weights("Which bridge?", [scored[0], Passage(3, "The bridge.", title="Bridge")], 0.1, prior)
    assert len(seen) == 3  # kept by text


def test_the_prior_is_a_cepe_setting_with_its_own_row_name():
    spec = ReaderSpec(reader="cepe", relevance_temperature=0.05, cepe_model="x")
    assert spec.label == "cepe-rel0.05" and spec.settings()["relevance_temperature"] == 0.05
    assert ReaderSpec(reader="cepe", relevance_temperature=0.0, cepe_model="x").label == "cepe-rel0"
    assert ReaderSpec(reader="cepe", cepe_model="x").label == "cepe"  # the checkpoint's own prior
    assert "relevance_temperature" not in ReaderSpec(reader="cepe", cepe_model="x").settings()
    assert "relevance_temperature" not in ReaderSpec(reader="concat").reader_options()
    with pytest.raises(CepeRagError, match="relevance-temperature"):
        ReaderSpec(reader="cepe", relevance_temperature=-1.0)


def test_a_checkpoint_names_its_own_prior_and_an_explicit_setting_wins(chat_tokenizer):
    from cepe_rag.readers.cepe import CepeReader

    model = pointer_model(chat_tokenizer)
    assert CepeReader(model, chat_tokenizer).relevance_temperature == 0.0
    model.reader_settings = {"relevance_temperature": 0.02}
    assert CepeReader(model, chat_tokenizer).relevance_temperature == 0.02
    assert CepeReader(model, chat_tokenizer, relevance_temperature=0.0).relevance_temperature == 0.0
