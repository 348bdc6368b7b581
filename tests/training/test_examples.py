"""Training data: corpora, held-out articles, and the examples of each stage."""

import json
import random

import pytest

from cepe_rag.training import ExampleBuilder, build_examples, load_articles
from cepe_rag.training.corpus import Article, held_out
from cepe_rag.training.examples import BLANK, cloze, cloze_candidates, load_examples, save_examples
from cepe_rag.types import CepeRagError

ARTICLES = [
    Article("Stanley Kubrick", "Stanley Kubrick was an American film director. He directed 2001: A Space Odyssey in "
                               "1968. He was born in New York City."),
    Article("Eiffel Tower", "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was completed in 1889 "
                            "for the World's Fair."),
    Article("Nile", "The Nile is a major river in northeastern Africa. It flows into the Mediterranean Sea."),
    Article("Mount Everest", "Mount Everest is Earth's highest mountain above sea level. It lies in the Himalayas "
                             "on the border of Nepal and China."),
]


@pytest.fixture(scope="module")
def builder(chat_tokenizer):
    from cepe_rag.readers import ClosedBookReader
    from tests.readers.conftest import tiny_chat_llama

    reader = ClosedBookReader(tiny_chat_llama(chat_tokenizer), chat_tokenizer)  # for its prompt format only
    return ExampleBuilder(chat_tokenizer, reader.chat_ids, seed=0), reader


def test_cloze_blanks_the_span_where_it_was_found_not_an_earlier_word_holding_it():
    article = Article("Eisaku Sato", "Eisaku Sato was a Japanese politician who led Japan from 1964 to 1972.")
    blanked = dict((span, text) for text, span in cloze_candidates(article))
    assert blanked["Japan"] == f"Eisaku Sato was a Japanese politician who led {BLANK} from 1964 to 1972."


def test_cloze_blanks_a_span_of_the_sentence():
    rng = random.Random(0)
    for article in ARTICLES:
        blanked, span = cloze(article, rng)
        assert BLANK in blanked and span in article.text and blanked.replace(BLANK, span) in article.text


def test_read_examples_hold_the_gold_article_and_answer_with_the_span(builder, chat_tokenizer):
    example_builder, reader = builder
    examples = build_examples("read", ARTICLES, example_builder, max_passages=3)
    assert len(examples) == len(ARTICLES)
    for article, example in zip(ARTICLES, examples):
        assert any(article.text in chunk for chunk in example.chunks) and 1 <= len(example.chunks) <= 3
        assert example.prompt_ids == reader.chat_ids(example.question)  # the reader's own prompt
        answer = chat_tokenizer.decode(example.target_ids)
        assert answer.endswith("<|im_end|>") and answer.removesuffix("<|im_end|>").strip() in article.text


def test_warmup_and_standard_examples(builder, chat_tokenizer):
    example_builder, _ = builder
    warmup = build_examples("warmup", ARTICLES, example_builder)
    assert " ".join(warmup[0].chunks) == chat_tokenizer.decode(warmup[0].target_ids)  # encoder sees the target
    standard = build_examples("standard", ARTICLES, example_builder, max_passages=2)
    for article, example in zip(ARTICLES, standard):
        target = chat_tokenizer.decode(example.target_ids)
        assert target in article.text and not any(target in chunk for chunk in example.chunks)
    with pytest.raises(CepeRagError, match="unknown stage"):
        build_examples("finetune", ARTICLES, example_builder)


def test_examples_round_trip_and_bad_files(builder, tmp_path):
    example_builder, _ = builder
    examples = build_examples("read", ARTICLES, example_builder)
    examples.append(examples[0])  # the same passages twice: stored once
    save_examples(examples, tmp_path / "e.jsonl")
    assert load_examples(tmp_path / "e.jsonl") == examples
    header, *rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert sorted(header["chunk_texts"]) == sorted({c for e in examples for c in e.chunks})
    assert all(isinstance(i, int) for row in rows for i in row["chunks"])
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(CepeRagError, match="not a training-examples file"):
        load_examples(tmp_path / "bad.jsonl")


def test_corpora_and_the_held_out_split(tmp_path):
    wiki = load_articles("wiki-summaries")
    assert len(wiki) > 10_000 and all(a.language == "en" for a in wiki)
    validation = [a for a in wiki if a.is_validation]
    assert 0.03 < len(validation) / len(wiki) < 0.07
    assert not {a.title for a in validation} & {a.title for a in wiki if not a.is_validation}
    assert len(load_articles("wiki-summaries", languages=("fr", "es"))) > 1000
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"title": f"t{i}", "text": f"text {i}"}) for i in range(3)))
    assert [a.title for a in load_articles(str(tmp_path / "c.jsonl"))] == ["t0", "t1", "t2"]
    assert held_out("t0") == held_out("t0")
    with pytest.raises(CepeRagError, match="no 'body' column"):
        load_articles(str(tmp_path / "c.jsonl"), text_field="body")
    with pytest.raises(CepeRagError, match="cannot load training corpus"):
        load_articles(str(tmp_path / "missing-dataset-name"))
    with pytest.raises(CepeRagError, match="no Wikipedia summaries"):
        load_articles("wiki-summaries", languages=("de",))


def test_qa_examples_read_retrieved_passages_and_answer_short(builder):
    from cepe_rag.training.examples import TrainingQuestion, build_qa_examples
    from cepe_rag.types import Passage

    example_builder, reader = builder
    corpus = [Passage(i, a.text, title=a.title) for i, a in enumerate(ARTICLES)]
    asked = []

    def retrieve(questions, k):  # the gold passage first, then the others
        asked.append(k)
        return [sorted(corpus, key=lambda p: "Paris" not in q or "Eiffel" not in p.title)[:k] for q in questions]

    questions = [TrainingQuestion("Where is the Eiffel Tower in Paris?", ["Paris", "France"]),
                 TrainingQuestion("Who painted the Mona Lisa?", ["Leonardo da Vinci"])]
    examples = build_qa_examples(questions, example_builder, retrieve, min_passages=2, max_passages=4)
    assert asked == [4] and len(examples) == 1  # the Mona Lisa's passages hold no answer: skipped
    example = examples[0]
    assert 2 <= len(example.chunks) <= 4 and example.chunks[0].startswith("Document (Title: Eiffel Tower)")
    assert example_builder.tokenizer.decode(example.target_ids) == "Paris<|im_end|>"  # the answer found, not France
    assert example.prompt_ids == reader.chat_ids("Question: Where is the Eiffel Tower in Paris?")
    kept = build_qa_examples(questions, example_builder, retrieve, min_passages=2, max_passages=4, unanswerable="keep")
    assert len(kept) == 2 and example_builder.tokenizer.decode(kept[1].target_ids) == "Leonardo da Vinci<|im_end|>"
    with pytest.raises(CepeRagError, match="policy"):
        build_qa_examples(questions, example_builder, retrieve, unanswerable="guess")


def test_qa_stage_refuses_the_benchmark_and_needs_an_index(builder, tmp_path):
    from cepe_rag.training.run import qa_examples

    benchmark = tmp_path / "NQ-open.dev.jsonl"
    benchmark.write_text('{"question": "q", "answer": ["a"]}\n')
    with pytest.raises(CepeRagError, match="is the NQ-open benchmark"):
        qa_examples(builder[0], [str(benchmark)], tmp_path, corpus="wiki-summaries", languages=("en",),
                    min_passages=1, max_passages=2, max_questions=0, n_validation=8, unanswerable="skip")
    with pytest.raises(CepeRagError, match="needs --questions"):
        qa_examples(builder[0], [], None, corpus="wiki-summaries", languages=("en",), min_passages=1,
                    max_passages=2, max_questions=0, n_validation=8, unanswerable="skip")


def test_corpus_questions_ask_a_span_in_place_and_read_their_article(builder):
    from cepe_rag.training.examples import build_qa_examples, corpus_questions, question_from_cloze
    from cepe_rag.types import Passage

    assert question_from_cloze(f"He directed it in {BLANK}.", "1968") == "He directed it in what year?"
    assert question_from_cloze(f"It is {BLANK} km long.", "6,650") == "It is what number km long?"
    assert question_from_cloze(f"{BLANK} directed it.", "Stanley Kubrick") == "What directed it?"
    questions = corpus_questions(ARTICLES, random.Random(0), per_article=2)
    assert len(questions) == 2 * len(ARTICLES)
    for question in questions:
        assert question.question.endswith("?") and question.answers[0] in question.gold.text
        assert question.question.replace("?", "") not in question.gold.text  # asked, not copied
    example_builder, _ = builder
    corpus = [Passage(i, a.text, title=a.title) for i, a in enumerate(ARTICLES)]
    examples = build_qa_examples(questions, example_builder, lambda qs, k: [corpus[:k] for _ in qs],
                                 min_passages=1, max_passages=3)
    assert len(examples) == len(questions)
    for question, example in zip(questions, examples):
        golds = [c for c in example.chunks if c.startswith(f"Document (Title: {question.gold.title})")]
        assert len(golds) == 1 and 1 <= len(example.chunks) <= 3  # the article once, whatever was retrieved
        assert example.chunks[example.gold_chunk] == golds[0]  # what the gold-attention loss points at


def test_phrase_questions_ask_for_the_common_noun_a_clause_ends_with():
    from cepe_rag.training.examples import corpus_questions, phrase_candidates

    article = Article("Blorvik Prize", "The Blorvik Prize is an annual award for typography. It was founded by the "
                                       "Hesk Academy. Its first winner is best known for the Dunmore conjecture, "
                                       "and for it. The firm is a maker of wind pumps.")
    assert phrase_candidates(article) == [
        ("The Blorvik Prize is an annual award for what?", "typography"),
        ("Its first winner is best known for what, and for it?", "Dunmore conjecture"),  # "it" is no answer
        ("The firm is a maker of what?", "wind pumps"),
    ]  # "by the Hesk Academy" ends with a name: that is the name spans' question, not this one
    questions = corpus_questions(ARTICLES + [article], random.Random(0), per_article=1, phrases=True)
    assert len(questions) == 1 and questions[0].gold.title == "Blorvik Prize"  # the others end clauses with names
    assert (questions[0].question, questions[0].answers[0]) in phrase_candidates(article)
