"""The sentence prior: inside each encoded passage, a sentence's share of the cross-attention and copy-pointer
softmaxes weighted by how like the question it is (per-token CrossContext.prior), scored as sentence focus scores;
and the question-name penalty, the copy pointer's own prior (CrossContext.copy_prior)."""

import re

import numpy as np
import pytest
import torch

from cepe_rag.cepe.model import group_by_request
from cepe_rag.readers.cepe import (
    CepeReader,
    RelevancePrior,
    asked_names,
    missing_name_share,
    passage_of_chunk,
    question_name_log_weights,
    question_names,
    sentence_log_weights,
)
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


def test_the_names_a_question_mentions():
    assert question_names("Who designed the Virkdeisund Bridge?") == {"virkdeisund", "bridge"}
    assert question_names("When did it open?") == set() and question_names("Where was Ilse Holm born?") == \
        {"ilse", "holm"}
    assert question_names("Who designed the Tresk Viaduct's towers?") == {"tresk", "viaduct"}


def test_the_copy_penalty_falls_on_the_question_names_and_the_article_before_them(chat_tokenizer):
    model = pointer_model(chat_tokenizer)
    text = VIADUCT.as_prompt_text()
    offsets = model.chunk_token_offsets([text])[0]
    weights = question_name_log_weights("Who designed the Tresk Viaduct?", text, offsets, 7.0)
    named = [(m.start(), m.end()) for m in re.finditer(r"The Tresk Viaduct|Tresk Viaduct", text)]
    for (start, end), weight in zip(offsets, weights):
        inside = any(a < end and start < b for a, b in named)
        assert weight == (-7.0 if inside else 0.0), text[start:end]
    assert weights.count(-7.0) >= 4
    assert question_name_log_weights("When did it open?", text, offsets, 7.0) == [0.0] * len(offsets)
    # typed in lower case, the question names what the passage capitalises: the same tokens
    assert question_name_log_weights("who designed the tresk viaduct", text, offsets, 7.0) == weights


def test_the_copy_prior_moves_the_pointer_and_not_the_cross_attention(chat_tokenizer):
    model = pointer_model(chat_tokenizer)
    ids = prompt_ids(chat_tokenizer)
    lengths = [[len(t) for t in model.tokenize_chunks(chunks)] for chunks in CHUNKS]
    penalties = [[[-5.0 * (i % 2) for i in range(n)] for n in ns] for ns in lengths]

    def run(copy_log_weights):
        flat = [text for chunks in CHUNKS for text in chunks]
        token_ids = model.tokenize_chunks(flat)
        states = model.encode_token_chunks(token_ids)
        built = model.context_from_states(group_by_request(states, CHUNKS),
                                          token_ids=group_by_request(token_ids, CHUNKS),
                                          copy_log_weights=copy_log_weights)
        hidden = model.decoder.base_model(input_ids=ids, cross_context=built).last_hidden_state
        return built, hidden, model(input_ids=ids, cross_context=built).logits

    with torch.no_grad():
        plain_context, plain_hidden, plain = run(None)
        penalised_context, hidden, penalised = run(penalties)
        zero_context, _, zero = run([[[0.0] * n for n in ns] for ns in lengths])
    torch.testing.assert_close(hidden, plain_hidden, rtol=0, atol=0)  # the cross-attention never sees it
    torch.testing.assert_close(zero, plain, rtol=0, atol=1e-12)
    assert (penalised - plain).abs().max() > 1e-4
    first, second = penalised_context.select_rows(torch.tensor([0])), penalised_context.select_rows(torch.tensor([1]))
    joined = first.join(second)
    torch.testing.assert_close(joined.copy_prior, penalised_context.copy_prior, rtol=0, atol=0)
    assert bool((first.join(plain_context.select_rows(torch.tensor([1]))).copy_prior[1] == 0).all())


def test_the_reader_penalises_question_names_for_the_pointer_only_when_asked(chat_tokenizer):
    model = pointer_model(chat_tokenizer)
    question = "Who designed the Tresk Viaduct?"
    other = Passage(3, "A castle stands on the hill.", title="Castle")
    plan = CepeReader(model, chat_tokenizer, question_name_penalty=10.0).prepare(question, [VIADUCT, other]).plan
    assert [len(w) for w in plan.copy_log_weights] == \
        [len(t) for t in model.tokenize_chunks([VIADUCT.as_prompt_text(), other.as_prompt_text()])]
    assert min(plan.copy_log_weights[0]) == -10.0 and set(plan.copy_log_weights[1]) == {0.0}
    assert CepeReader(model, chat_tokenizer).prepare(question, [VIADUCT]).plan.copy_log_weights is None
    lower = CepeReader(model, chat_tokenizer, question_name_penalty=10.0).prepare(question.lower(), [VIADUCT]).plan
    assert lower.copy_log_weights == plan.copy_log_weights[:1]
    spec = ReaderSpec(reader="cepe", question_name_penalty=10.0, cepe_model="x")
    assert spec.label == "cepe-qn10" and spec.settings()["question_name_penalty"] == 10.0
    with pytest.raises(CepeRagError, match="question-name-penalty"):
        ReaderSpec(reader="cepe", question_name_penalty=-1.0)


def test_the_name_match_prior_weighs_down_a_near_namesake(chat_tokenizer):
    """Two passages as like the question (equal cosines): the one lacking half the question's names loses
    penalty / 2 of log weight; a question naming nothing, or a penalty of 0, leaves the relevance prior as it is."""
    model = pointer_model(chat_tokenizer)
    namesake = Passage(2, "The Tresl Viaduct is a railway bridge. It was designed by Ole Berg.", title="Tresl Viaduct")
    question = "Who designed the Tresk Viaduct?"
    names = question_names(question)
    assert missing_name_share(names, f"{namesake.title} {namesake.text}") == 0.5
    assert missing_name_share(names, f"{VIADUCT.title} {VIADUCT.text}") == 0.0
    assert missing_name_share(question_names("Who designed the Tresk Viaduct's towers?"), "The Tresk Viaduct") == 0.0
    assert missing_name_share(set(), "The Tresk Viaduct") == 0.0

    def weights(penalty, asked=question):
        reader = CepeReader(model, chat_tokenizer, relevance_temperature=0.5, name_match_penalty=penalty,
                            embedder=RelationEmbedder())
        return reader.prepare(asked, [VIADUCT, namesake]).plan.log_weights

    assert weights(0.0) == pytest.approx([np.log(0.5)] * 2)
    assert weights(6.0) == pytest.approx(torch.log_softmax(torch.tensor([0.0, -3.0], dtype=torch.float64), 0).tolist())
    assert weights(6.0, "Who designed it?") == pytest.approx([np.log(0.5)] * 2)
    # typed in lower case, the question's names are the words the passages write as names: the same weights
    assert weights(6.0, "who designed the tresk viaduct") == weights(6.0)
    assert asked_names("who designed the tresk viaduct", ["Castle"], ["A castle. Tresk is a town."]) == set()
    assert asked_names("who designed the tresk viaduct", ["Castle"], ["Near Tresk, a viaduct."]) == {"tresk"}
    alone = CepeReader(model, chat_tokenizer, relevance_temperature=0.5, name_match_penalty=6.0,
                       embedder=RelationEmbedder())
    assert alone.prepare(question, [namesake]).plan.log_weights is None  # one passage: nothing to weigh
    with pytest.raises(CepeRagError, match="needs --relevance-temperature"):
        ReaderSpec(reader="cepe", name_match_penalty=6.0, relevance_temperature=0.0)
    spec = ReaderSpec(reader="cepe", name_match_penalty=6.0, cepe_model="x")
    assert spec.label == "cepe-nm6" and spec.settings()["name_match_penalty"] == 6.0
    with pytest.raises(CepeRagError, match="name-match-penalty"):
        ReaderSpec(reader="cepe", name_match_penalty=-1.0)
    model.reader_settings = {"name_match_penalty": 4.0}
    try:
        assert CepeReader(model, chat_tokenizer).name_match_penalty == 4.0
    finally:
        model.reader_settings = {}
