"""The sentence prior: inside each encoded passage, a sentence's share of the cross-attention and copy-pointer
softmaxes weighted by how like the question it is (per-token CrossContext.prior), scored as sentence focus scores."""

import numpy as np
import pytest
import torch

from cepe_rag.readers.cepe import CepeReader, RelevancePrior, passage_of_chunk, sentence_log_weights
from cepe_rag.settings import ReaderSpec
from cepe_rag.types import CepeRagError, Passage
from tests.cepe.test_pointer import CHUNKS, pointer_model, prompt_ids
from tests.cepe.test_relevance_prior import context

VIADUCT = Passage(1, "The Tresk Viaduct is a railway bridge. It was designed by Anna Holm. It opened in 1887.",
                  title="Tresk Viaduct")


class RelationEmbedder:
    """Unit vectors by the relation a text names; records what it was asked to embed."""

    def __init__(self):
        self.seen = []

    def encode(self, texts, **kwargs):
        self.seen.extend(texts)
        rows = [[1.0, 0.0] if "design" in t else [0.6, 0.8] if "open" in t else [0.0, 1.0] for t in texts]
        return np.asarray(rows, dtype=np.float32)


def test_token_offsets_line_up_with_the_chunk_ids(chat_tokenizer):
    model = pointer_model(chat_tokenizer)
    texts = [VIADUCT.as_prompt_text(), "", "one more"]
    ids, offsets = model.tokenize_chunks(texts), model.chunk_token_offsets(texts)
    assert [len(i) for i in ids] == [len(o) for o in offsets] and offsets[1] == []
    for text, spans in zip(texts, offsets):
        assert all(0 <= a <= b <= len(text) for a, b in spans)
        assert [a for a, _ in spans] == sorted(a for a, _ in spans)


def test_the_sentence_most_like_the_question_keeps_its_weight_and_the_others_are_scaled_down(chat_tokenizer):
    model = pointer_model(chat_tokenizer)
    text = VIADUCT.as_prompt_text()
    offsets = model.chunk_token_offsets([text])[0]
    embedder = RelationEmbedder()
    weights = sentence_log_weights("Who designed the Tresk Viaduct?", VIADUCT, text, offsets, 0.1,
                                   RelevancePrior(0.1, embedder))
    assert len(weights) == len(offsets)
    opened, first = (0.6 - 1.0) / 0.1, (0.0 - 1.0) / 0.1
    head_end = text.index("The Tresk")
    second, third = text.index("It was designed"), text.index("It opened")
    for (start, end), weight in zip(offsets, weights):
        expected = 0.0 if start < head_end or second <= start < third else opened if start >= third else first
        assert weight == pytest.approx(expected), text[start:end]
    # Scored as sentence focus scores: the title's words out of the question and of every sentence.
    assert "Who designed the ?" in embedder.seen and not any("Tresk" in t for t in embedder.seen)


def test_a_chunk_text_gives_back_its_passage():
    titled = Passage(3, "It orbits: fast (88 days).", title="Mercury (planet)")
    for passage in (VIADUCT, Passage(2, "No title: here (really)."), titled):
        again = passage_of_chunk(passage.as_prompt_text())
        assert (again.title, again.text) == (passage.title, passage.text)


def test_a_passage_of_one_sentence_gets_no_sentence_weights(chat_tokenizer):
    model = pointer_model(chat_tokenizer)
    passage = Passage(2, "It was designed by Anna Holm.", title="Tresk Viaduct")
    text = passage.as_prompt_text()
    offsets = model.chunk_token_offsets([text])[0]
    embedder = RelationEmbedder()
    weights = sentence_log_weights("Who?", passage, text, offsets, 0.1, RelevancePrior(0.1, embedder))
    assert weights == [0.0] * len(offsets) and embedder.seen == []


@pytest.mark.parametrize("cross_kv", ["cache", "absorb"])
def test_per_token_weights_equal_to_the_chunks_weight_are_the_chunk_prior(chat_tokenizer, cross_kv):
    model = pointer_model(chat_tokenizer)
    ids = prompt_ids(chat_tokenizer)
    lengths = [[len(t) for t in model.tokenize_chunks(chunks)] for chunks in CHUNKS]
    chunk_weights = [[0.0, -3.0], [-2.0, 0.0]]
    per_token = [[[w] * n for w, n in zip(ws, ns)] for ws, ns in zip(chunk_weights, lengths)]
    with torch.no_grad():
        by_chunk = model(input_ids=ids, cross_context=context(model, CHUNKS, chunk_weights, cross_kv)).logits
        by_token = model(input_ids=ids, cross_context=context(model, CHUNKS, per_token, cross_kv)).logits
        varied = [[[w - 0.5 * (i % 2) for i in range(n)] for w, n in zip(ws, ns)]
                  for ws, ns in zip(chunk_weights, lengths)]
        other = model(input_ids=ids, cross_context=context(model, CHUNKS, varied, cross_kv)).logits
    torch.testing.assert_close(by_token, by_chunk, rtol=0, atol=0)
    assert (other - by_chunk).abs().max() > 1e-6


def test_the_reader_adds_sentence_weights_to_each_passages_weight(chat_tokenizer):
    model = pointer_model(chat_tokenizer)
    reader = CepeReader(model, chat_tokenizer, relevance_temperature=0.5, sentence_temperature=0.1,
                        embedder=RelationEmbedder())
    other = Passage(3, "A castle stands on the hill. It has four towers.", title="Castle")
    plan = reader.prepare("Who designed the Tresk Viaduct?", [VIADUCT, other]).plan
    combined = plan.chunk_log_weights()
    assert len(combined) == 2 and [len(c) for c in combined] == \
        [len(t) for t in model.tokenize_chunks([VIADUCT.as_prompt_text(), other.as_prompt_text()])]
    for chunk_weight, tokens, row in zip(plan.log_weights, plan.token_log_weights, combined):
        assert row == pytest.approx([chunk_weight + t for t in tokens])
    assert max(plan.token_log_weights[0]) == 0.0 and min(plan.token_log_weights[0]) < -3
    sharp = CepeReader(model, chat_tokenizer, relevance_temperature=0.01, sentence_temperature=0.1,
                       embedder=RelationEmbedder()).prepare("Who designed the Tresk Viaduct?", [VIADUCT, other]).plan
    assert sharp.log_weights[1] < -15 and set(sharp.token_log_weights[1]) == {0.0}  # weighed out: nothing to weigh
    without = CepeReader(model, chat_tokenizer, relevance_temperature=0.5, embedder=RelationEmbedder())
    assert without.prepare("Who designed the Tresk Viaduct?", [VIADUCT, other]).plan.token_log_weights is None


def test_the_sentence_prior_is_a_cepe_setting_a_card_can_name(chat_tokenizer):
    spec = ReaderSpec(reader="cepe", relevance_temperature=0.05, sentence_temperature=0.1, cepe_model="x")
    assert spec.label == "cepe-rel0.05-sent0.1" and spec.settings()["sentence_temperature"] == 0.1
    assert "sentence_temperature" not in ReaderSpec(reader="cepe", cepe_model="x").settings()
    with pytest.raises(CepeRagError, match="sentence-temperature"):
        ReaderSpec(reader="cepe", sentence_temperature=-0.1)
    model = pointer_model(chat_tokenizer)
    assert CepeReader(model, chat_tokenizer).sentence_temperature == 0.0
    model.reader_settings = {"sentence_temperature": 0.2}
    assert CepeReader(model, chat_tokenizer).sentence_temperature == 0.2
    assert CepeReader(model, chat_tokenizer, sentence_temperature=0.0).sentence_temperature == 0.0


def test_training_under_the_sentence_prior_weighs_tokens_as_the_reader_will(chat_tokenizer):
    from cepe_rag.training import TrainConfig
    from cepe_rag.training.run import training_prior

    model = pointer_model(chat_tokenizer)
    other = Passage(3, "A castle stands on the hill. It opened to visitors in 1990.", title="Castle")
    question = "Who designed the Tresk Viaduct?"
    reader = CepeReader(model, chat_tokenizer, relevance_temperature=0.0, sentence_temperature=0.1,
                        embedder=RelationEmbedder())
    expected = reader.prepare(question, [VIADUCT, other]).plan.chunk_log_weights()
    weigh = training_prior(model, TrainConfig(stage="swap", sentence_temperature=0.1), embedder=RelationEmbedder())
    assert weigh(question, [VIADUCT.as_prompt_text(), other.as_prompt_text()]) == expected
    assert training_prior(model, TrainConfig(stage="swap")) is None
