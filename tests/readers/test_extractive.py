import numpy as np
import pytest
import torch

from cepe_rag.readers import ConcatReader, GenerationConfig
from cepe_rag.readers.extractive import SpanConstraint, constrain_logits
from cepe_rag.settings import ReaderSpec
from cepe_rag.types import Passage
from tests.readers.conftest import tiny_chat_llama
from tests.readers.test_readers import tiny_cepe_reader

UNSPACED = np.arange(20)
UNSPACED[1] = 11  # token 1 (" Lucia") is written 11 ("Lucia") at the start of a line


def test_span_constraint_follows_the_spans_the_answer_has_matched():
    constraint = SpanConstraint([[1, 2, 3], [2, 4]], UNSPACED)
    assert constraint.allowed().tolist() == [1, 2, 3, 4, 11]  # any passage token, or its line-start form, first
    constraint.advance(2)  # in both passages
    assert constraint.allowed().tolist() == [3, 4]
    constraint.advance(4)
    assert constraint.allowed().tolist() == []  # the second passage ends: only ending is left

    started_unspaced = SpanConstraint([[1, 2, 3], [2, 4]], UNSPACED)
    started_unspaced.advance(11)
    assert started_unspaced.allowed().tolist() == [2]


def test_no_span_crosses_from_one_passage_into_the_next():
    constraint = SpanConstraint([[5, 6], [7, 8]], UNSPACED)
    constraint.advance(6)
    assert constraint.allowed().tolist() == []


def test_an_answer_ends_only_where_a_word_of_its_passage_ends():
    word_starts = np.ones(20, dtype=bool)
    word_starts[[2, 3]] = False  # 2 and 3 continue the word before them ("Zathfaex" + "ov")
    constraint = SpanConstraint([[1, 2, 3, 5], [1, 4]], UNSPACED, word_starts)
    assert constraint.may_end()  # nothing written yet
    constraint.advance(1)  # in both passages: the second lets the word end after it
    assert constraint.may_end()
    constraint.advance(2)  # only the first: "3" still continues the word
    assert not constraint.may_end()
    logits = torch.zeros(1, 20)
    assert torch.isfinite(constrain_logits(logits, [constraint], end_ids=[0])[0]).nonzero().flatten().tolist() == [3]
    constraint.advance(3)
    assert constraint.may_end()


def test_constrain_logits_masks_only_constrained_rows_and_keeps_end_of_sequence():
    logits = torch.randn(2, 20)
    constraint = SpanConstraint([[1, 2, 3]], UNSPACED)
    constraint.advance(1)
    out = constrain_logits(logits, [constraint, None], end_ids=[0])
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [0, 2]
    assert torch.equal(out[1], logits[1])
    assert constrain_logits(logits, [None, None], end_ids=[0]) is logits


PASSAGES = [Passage(1, "Mirela Stanchev founded the Orvane Glassworks in 1886 near the river.", "Orvane Glassworks"),
            Passage(2, "The Telvik Bridge was designed by Ansel Morrow and opened in 1902.", "Telvik Bridge")]
QUESTIONS = ["Who founded the Orvane Glassworks?", "Who designed the Telvik Bridge?", "When did it open?",
             "What is near the river?", "Name something."]


def _is_span(answer: str) -> bool:
    return any(answer.strip() in piece for p in PASSAGES for piece in (p.title, p.text))


@pytest.fixture(scope="module")
def tiny_chat_model(chat_tokenizer):
    """A random decoder that writes words: its end-of-sequence and line-break embeddings are zero (logit 0, below
    most of 49k random logits), else it writes blank lines, which strip to an empty answer."""
    model = tiny_chat_llama(chat_tokenizer)
    with torch.no_grad():
        for token in ("<|im_end|>", "<|endoftext|>", "Ċ"):
            model.get_input_embeddings().weight[chat_tokenizer.convert_tokens_to_ids(token)] = 0
    return model


def test_extractive_answers_are_spans_of_the_passages_read(tiny_chat_model, chat_tokenizer):
    generation = GenerationConfig(max_new_tokens=12)
    free = ConcatReader(tiny_chat_model, chat_tokenizer, generation=generation)
    extractive = ConcatReader(tiny_chat_model, chat_tokenizer, generation=generation, extractive=True)
    assert not all(_is_span(free.answer(q, PASSAGES).text) for q in QUESTIONS)  # a random model invents text
    answers = extractive.answer_batch(QUESTIONS, [PASSAGES] * len(QUESTIONS))
    assert all(_is_span(a.text) for a in answers), [a.text for a in answers]
    assert sum(bool(a.text) for a in answers) >= 3  # spans, not just empty answers
    for question, answer in zip(QUESTIONS, answers):  # each row's constraint follows its row
        assert extractive.answer(question, PASSAGES).text == answer.text


def test_cepe_reader_reads_extractive_from_its_card_unless_told(tiny_chat_model, chat_tokenizer):
    reader = tiny_cepe_reader(tiny_chat_model, chat_tokenizer, "copy")
    assert reader.extractive is False
    reader.model.reader_settings = {"extractive": True}
    try:
        assert tiny_cepe_reader(tiny_chat_model, chat_tokenizer, "copy").extractive is False  # a fresh model
        carded = type(reader)(reader.model, chat_tokenizer)
        assert carded.extractive is True
        assert type(reader)(reader.model, chat_tokenizer, extractive=False).extractive is False
        answer = carded.answer("Who founded the Orvane Glassworks?", PASSAGES).text
        assert _is_span(answer), answer
    finally:
        reader.model.reader_settings = {}


def test_extractive_has_its_own_evaluation_row():
    assert ReaderSpec(reader="concat", extractive=True).label == "concat-extractive"
    assert ReaderSpec(reader="concat", extractive=False).label == "concat"
    assert ReaderSpec(reader="cepe").label == "cepe"  # the checkpoint's own setting
    assert ReaderSpec(reader="cepe", extractive=False).label == "cepe-free"
    assert ReaderSpec(reader="concat", extractive=True).settings()["extractive"] is True
    assert "extractive" not in ReaderSpec(reader="concat").settings()


def test_an_extractive_answer_does_not_start_on_a_name_the_question_mentions(chat_tokenizer):
    from cepe_rag.readers.extractive import span_constraint

    text = "The Telvik Bridge was designed by John Smith."
    constraint = span_constraint("What do we know of the Telvik Bridge?", [text], chat_tokenizer)
    starts = {chat_tokenizer.decode([i]).strip() for i in constraint.allowed()}
    assert {"John", "designed", "was"} <= starts and not {"The", "Tel", "vik", "Bridge"} & starts
    constraint.advance(chat_tokenizer.convert_tokens_to_ids("Ġby"))  # a name may still follow a start
    assert [chat_tokenizer.decode([i]) for i in constraint.allowed()] == [" John"]
    free = span_constraint("When was it designed?", [text], chat_tokenizer)
    assert {"The", "Tel"} <= {chat_tokenizer.decode([i]).strip() for i in free.allowed()}


def test_a_lower_case_question_names_the_words_a_passage_capitalises(chat_tokenizer):
    from cepe_rag.readers.extractive import span_constraint

    text = "The Los Angeles Dodgers last won the World Series in 1988, a series of five games."
    question = "the last time la dodgers won the world series"
    starts = {chat_tokenizer.decode([i]).strip() for i in span_constraint(question, [text], chat_tokenizer).allowed()}
    # capitalised question words are names (and the article before one); the same words in lower case are not
    assert not {"Dod", "Dodgers", "World", "Series"} & starts
    assert {"Los", "1", "series", "five"} <= starts
    cased = span_constraint("What did the Dodgers win?", [text], chat_tokenizer)  # the function words stay free
    assert {"The", "World", "Series", "last"} <= {chat_tokenizer.decode([i]).strip() for i in cased.allowed()}
    lake = "The Dinbreskel River flows into Lake Zotyvis."  # the word a question asks for is not its name
    asked = span_constraint("Into which lake does the Dinbreskel River flow?", [lake], chat_tokenizer)
    assert "Lake" in {chat_tokenizer.decode([i]).strip() for i in asked.allowed()}


def test_word_starts_tell_a_new_word_from_the_rest_of_one(chat_tokenizer):
    from cepe_rag.token_forms import word_starts

    starts = word_starts(chat_tokenizer, len(chat_tokenizer))
    pieces = chat_tokenizer("Zathfaexov built it in 2070.", add_special_tokens=False)["input_ids"]
    flags = {chat_tokenizer.decode([i]): bool(starts[i]) for i in pieces}
    assert flags[" built"] and flags["."] and not flags["ov"]


def test_a_cepe_answer_is_not_a_span_of_a_passage_its_prior_all_but_removes(tiny_chat_model, chat_tokenizer):
    """With a sharp relevance prior the encoded passages weighted below e^-15 leave the span constraint (the reader
    did not read them); a passage in the prompt always stays; without a prior every passage read stays."""
    from cepe_rag.readers.extractive import span_constraint
    from tests.readers.test_readers import PASSAGES as TOPICS
    from tests.readers.test_readers import TopicEmbedder

    question, passages = "What is topic 3?", TOPICS[:5]

    def first_tokens(reader):
        prepared = reader.prepare_request(question, passages)
        return [p.id for p in reader.answerable_passages(prepared)], reader.span_constraints([prepared])[0].allowed()

    def allowed_from(ids):
        return span_constraint(question, [piece for p in TOPICS if p.id in ids for piece in (p.title, p.text)],
                               chat_tokenizer).allowed()

    sharp = tiny_cepe_reader(tiny_chat_model, chat_tokenizer, "copy", relevance_temperature=0.001,
                             embedder=TopicEmbedder(), extractive=True)
    ids, allowed = first_tokens(sharp)
    assert ids == [3] and np.array_equal(allowed, allowed_from({3}))
    assert not np.array_equal(allowed, allowed_from(set(range(5))))  # the others' spans would add first tokens
    sharp.n_prompt_passages = 1
    assert first_tokens(sharp)[0] == [0, 3]
    mild = tiny_cepe_reader(tiny_chat_model, chat_tokenizer, "copy", relevance_temperature=1.0,
                            embedder=TopicEmbedder(), extractive=True)
    plain = tiny_cepe_reader(tiny_chat_model, chat_tokenizer, "copy", extractive=True)
    for reader in (mild, plain):
        ids, allowed = first_tokens(reader)
        assert ids == [0, 1, 2, 3, 4] and np.array_equal(allowed, allowed_from(set(range(5))))
    answer = sharp.answer(question, passages).text.strip()
    assert answer in TOPICS[3].text or answer in TOPICS[3].title
