"""The relevance cutoff: a reader reads the passages within its margin of the best similarity, and says so."""

import pytest

from cepe_rag.readers import ConcatReader, GenerationConfig
from cepe_rag.readers.base import read_selection
from cepe_rag.settings import DEFAULT_READ_MARGIN, ReaderSpec
from cepe_rag.types import CepeRagError, Passage
from tests.readers.conftest import tiny_chat_llama

SCORED = [Passage(i, f"Passage {i} text.", f"Title {i}", dense_score=s) for i, s in
          enumerate([0.71, 0.52, 0.69, None, 0.30])]


def test_read_selection_keeps_passages_near_the_best_in_order():
    kept, rule = read_selection(SCORED, 0.05)
    assert [p.id for p in kept] == [0, 2, 3]  # a passage without a similarity is never cut
    assert rule == "read 3 of 5 passages: the top-ranked and those within 0.05 of the best similarity (0.71)"
    assert read_selection(SCORED, 0.0) == ([SCORED[0], SCORED[3]], "read 2 of 5 passages: the top-ranked and any "
                                                                      "other as similar as the best (0.71)")
    second_best = [SCORED[1], *SCORED[:1]]  # the top-ranked passage is read even when its cosine is not the best
    assert [p.id for p in read_selection(second_best, 0.1)[0]] == [1, 0]
    assert len(read_selection(SCORED, 1.0)[0]) == 5


def test_read_selection_without_margin_or_similarities_reads_all():
    assert read_selection(SCORED, None) == (SCORED, "read 5 of 5 passages (no relevance cutoff)")
    given = [Passage(i, "text") for i in range(3)]
    assert read_selection(given, 0.0) == (given, "read 3 of 3 passages (no similarities to compare)")
    assert read_selection([], 0.1) == ([], "")


@pytest.fixture(scope="module")
def tiny_chat_model(chat_tokenizer):
    return tiny_chat_llama(chat_tokenizer)


def test_reader_reads_what_the_cutoff_keeps_and_reports_it(tiny_chat_model, chat_tokenizer):
    generation = GenerationConfig(max_new_tokens=3)
    cut = ConcatReader(tiny_chat_model, chat_tokenizer, generation=generation, read_margin=0.05)
    answer = cut.answer("What is topic 2?", SCORED)
    assert [p.id for p in answer.passages] == [0, 2, 3] and answer.usage["passages_read"] == 3
    assert answer.read_rule.startswith("read 3 of 5 passages")
    # Exactly the answer of a fixed-k reader given those three passages.
    fixed = ConcatReader(tiny_chat_model, chat_tokenizer, generation=generation)
    alone = fixed.answer("What is topic 2?", [SCORED[i] for i in (0, 2, 3)])
    assert alone.text == answer.text and alone.read_rule == "read 3 of 3 passages (no relevance cutoff)"
    assert list(cut.stream("What is topic 2?", SCORED)) == list(fixed.stream("What is topic 2?", alone.passages))
    with pytest.raises(CepeRagError, match="margin"):
        ConcatReader(tiny_chat_model, chat_tokenizer, read_margin=-0.1)


def test_the_cutoff_is_a_reader_setting_with_one_default():
    assert ReaderSpec().read_margin == DEFAULT_READ_MARGIN
    assert "read_margin" not in ReaderSpec(read_margin=None).settings()
    assert ReaderSpec(read_margin=0.1).settings()["read_margin"] == 0.1
    assert "read_margin" not in ReaderSpec(reader="closed-book").settings()
    with pytest.raises(CepeRagError, match="must be 0 or more"):
        ReaderSpec(read_margin=-0.1)  # refused where the spec is made, before a model loads
