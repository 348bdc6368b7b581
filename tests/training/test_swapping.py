"""Entity-swapped examples: invented names applied consistently, answers only in the passages, a curriculum."""

import random

import pytest

from cepe_rag.eval.owndocs import generate
from cepe_rag.training.corpus import Article
from cepe_rag.training.swapping import (
    SwapNames,
    apply_mapping,
    build_swapped_examples,
    curriculum_counts,
    disguise,
    short_question,
    swapped_question,
    swapped_questions,
)
from cepe_rag.types import Passage
from tests.training.test_examples import ARTICLES

ORIGINAL = set(" ".join(f"{a.title} {a.text}" for a in ARTICLES).split())


def test_a_disguise_invents_the_subject_and_about_half_the_other_names():
    rng = random.Random(0)
    names = SwapNames(rng, forbidden=set())
    text = " ".join(["It met Aldo and Bruna in Cairo, Delft, Essen, Fargo, Genoa, Hanoi, Izmir and Kyoto."] * 3)
    passage = disguise(Passage(1, text, title="Tresk Viaduct"), {"Cairo": "Chawo"}, names, rng)
    assert "Tresk" not in passage.title and "Viaduct" not in passage.title and "Chawo" in passage.text
    others = ["Aldo", "Bruna", "Delft", "Essen", "Fargo", "Genoa", "Hanoi", "Izmir", "Kyoto"]
    kept = [name for name in others if name in passage.text]
    assert 2 <= len(kept) <= 7  # about half, each everywhere it occurs or nowhere
    assert all(passage.text.count(name) == 3 for name in kept) and passage.text.startswith("It met")


def test_swap_names_never_meet_the_benchmark_names():
    names = SwapNames(random.Random(0), forbidden={"paris"})
    made = {names.word().lower() for _ in range(2000)}
    benchmark = {word.lower() for entity in generate(n_groups=80, seed=0) for word in entity.name.split()}
    assert not made & benchmark and "paris" not in made
    assert all(set(word) & set("cjw") for word in made)


def test_mapping_replaces_whole_words_only():
    mapping = {"Nile": "Chawo", "1889": "1901"}
    assert apply_mapping("The Nile, Niles and Nile's delta in 1889 (18890).", mapping) == \
        "The Chawo, Niles and Chawo's delta in 1901 (18890)."


def test_swapped_question_answer_is_in_the_swapped_gold_and_not_the_original():
    rng = random.Random(0)
    names = SwapNames(rng, forbidden=set())
    for article in ARTICLES:
        made = swapped_question(article, names, rng)
        assert made is not None
        question, extra = made
        answer = question.answers[0]
        assert answer in question.gold.text and answer not in article.text
        assert question.gold.text == apply_mapping(article.text, extra["mapping"])
        assert not set(extra["mapping"].values()) & set(article.text.split())


LONG_ARTICLE = Article(
    "Tresk Viaduct",
    "The Tresk Viaduct is a railway bridge over the Odra in Silesia. It was designed by Anna Holm and opened in "
    "1887. Its central arch spans 94 metres. The viaduct carried trains of the Prussian railways to Breslau until "
    "1945. Since 1990 it has been a museum run by the Tresk Society.")


def test_several_questions_of_one_article_ask_different_facts_under_one_mapping():
    rng = random.Random(0)
    names = SwapNames(rng, forbidden=set())
    for seed in range(20):
        rng.seed(seed)
        questions, extra = swapped_questions(LONG_ARTICLE, names, rng, count=3, short_share=0.5)
        assert len(questions) == 3
        answers = [q.answers[0] for q in questions]
        assert len(set(answers)) == 3
        gold = questions[0].gold
        assert all(q.gold == gold for q in questions)
        assert gold.text == apply_mapping(LONG_ARTICLE.text, extra["mapping"])
        assert "Tresk" not in gold.text and "Viaduct" not in gold.text
        subject = {extra["mapping"]["Tresk"], extra["mapping"]["Viaduct"]}
        for question, query in zip(questions, extra["queries"]):
            answer = question.answers[0]
            assert answer in gold.text and answer not in LONG_ARTICLE.text
            # It names the subject, and never asks for it (a reader must not learn "answer the subject's name").
            assert any(name in question.question for name in subject) and not any(n in answer for n in subject)
            assert query in LONG_ARTICLE.text  # the distractors are retrieved for the real sentence
            # Every capitalised word the question shows is in its passage: no name the swap removed.
            shown = {w.strip("?:,.'’s") for w in question.question.split() if w[:1].isupper()}
            assert all(word in gold.text or word in {"What"} for word in shown), (question.question, gold.text)


def test_a_short_question_keeps_the_subject_and_the_words_beside_the_answer():
    asked = "The Chawo Viaduct is a railway bridge. It was designed by _____ and opened in 1887."
    assert short_question(asked, "Wenc Jol", "Chawo Viaduct") == "Chawo Viaduct: It was designed by what and opened?"
    assert short_question("Since _____ it has been a museum, run by the society.", "1990", "Chawo") == \
        "Chawo: Since what year it has been?"
    assert short_question("_____", "1990", "Chawo") is None


def test_curriculum_grows_the_number_of_passages():
    counts = curriculum_counts(400, 1, 20, random.Random(0))
    assert all(1 <= c <= 20 for c in counts)
    assert max(counts[:40]) <= 4 and max(counts[200:]) == 20
    assert sum(counts[:100]) < sum(counts[300:])
    assert all(c == 20 or c >= 1 for c in curriculum_counts(50, 1, 20, random.Random(0), curriculum=False))


def test_swapped_examples_hold_the_swapped_gold_among_swapped_distractors(chat_tokenizer):
    from cepe_rag.readers import ClosedBookReader
    from cepe_rag.training import ExampleBuilder
    from tests.readers.conftest import tiny_chat_llama

    reader = ClosedBookReader(tiny_chat_llama(chat_tokenizer), chat_tokenizer)
    pool = [Passage(i, a.text, title=a.title) for i, a in enumerate(ARTICLES)]
    queries = []

    def retrieve(texts, k):
        queries.extend(texts)
        return [pool[:k] for _ in texts]

    for stage in ("find", "swap"):
        builder = ExampleBuilder(chat_tokenizer, reader.chat_ids, seed=0)
        examples = build_swapped_examples(stage, ARTICLES, builder, retrieve, min_passages=1, max_passages=3,
                                          forbidden=set(), curriculum=False)
        assert len(examples) == len(ARTICLES)
        for article, example in zip(ARTICLES, examples):
            assert 1 <= len(example.chunks) <= 3
            assert not any(article.title in chunk for chunk in example.chunks)  # the subject is renamed everywhere
            target = chat_tokenizer.decode(example.target_ids).removesuffix("<|im_end|>").strip()
            assert sum(target in chunk for chunk in example.chunks) >= 1
            assert target in example.chunks[example.gold_chunk]  # what the gold-attention loss points at
            assert example.prompt_ids == reader.chat_ids(example.question)
            # Every passage is disguised as the gold is: invented names (c, j or w) in each, no original title left.
            for chunk in example.chunks:
                assert any(set(word.lower()) & set("cjw") and word not in ORIGINAL for word in chunk.split())
                assert not any(a.title in chunk for a in ARTICLES)
    assert all(query in " ".join(a.text for a in ARTICLES) for query in queries)  # retrieved for the real text


def test_several_questions_per_article_sit_side_by_side_with_one_gold(chat_tokenizer):
    from cepe_rag.readers import ClosedBookReader
    from cepe_rag.training import ExampleBuilder
    from tests.readers.conftest import tiny_chat_llama

    reader = ClosedBookReader(tiny_chat_llama(chat_tokenizer), chat_tokenizer)
    pool = [Passage(i, a.text, title=a.title) for i, a in enumerate(ARTICLES)]
    builder = ExampleBuilder(chat_tokenizer, reader.chat_ids, seed=0)
    examples = build_swapped_examples("swap", [LONG_ARTICLE], builder, lambda texts, k: [pool[:k] for _ in texts],
                                      min_passages=3, max_passages=3, forbidden=set(), curriculum=False,
                                      questions_per_article=3, short_questions=1.0)
    assert len(examples) == 3
    golds = {example.chunks[example.gold_chunk] for example in examples}
    targets = {tuple(example.target_ids) for example in examples}
    assert len(golds) == 1 and len(targets) == 3
    assert all(example.question.count(":") >= 1 and len(example.question.split()) <= 12 for example in examples)


@pytest.mark.parametrize("n_prompt", [1, 2])
def test_prompt_passages_are_written_as_the_cepe_reader_writes_them(chat_tokenizer, n_prompt):
    """`--prompt-passages 1`: the first passage goes in the prompt exactly as `cepe --n-prompt-passages 1` puts it
    there, the rest to the encoder; the gold is in the prompt about half the time and otherwise in the encoder."""
    from cepe_rag.cepe import CepeForCausalLM
    from cepe_rag.readers.cepe import CepeReader
    from cepe_rag.training import ExampleBuilder
    from tests.cepe.test_modeling import tiny_bert
    from tests.readers.conftest import tiny_chat_llama

    model = CepeForCausalLM(tiny_chat_llama(chat_tokenizer), tiny_bert(), num_cross_attn_layers=1)
    reader = CepeReader(model, chat_tokenizer, n_prompt_passages=n_prompt)
    pool = [Passage(i, a.text, title=a.title) for i, a in enumerate(ARTICLES)]
    articles = ARTICLES * 10
    builder = ExampleBuilder(chat_tokenizer, reader.chat_ids, seed=0, prompt_passages=n_prompt)
    examples = build_swapped_examples("swap", articles, builder, lambda texts, k: [pool[:k] for _ in texts],
                                      min_passages=3, max_passages=3, forbidden=set(), curriculum=False)
    gold_in_prompt = 0
    for example in examples:
        assert len(example.chunks) == 3 - n_prompt
        prompt = chat_tokenizer.decode(example.prompt_ids)
        target = chat_tokenizer.decode(example.target_ids).removesuffix("<|im_end|>").strip()
        in_prompt = target in prompt.split(example.question)[0]
        gold_in_prompt += in_prompt
        assert in_prompt or any(target in chunk for chunk in example.chunks)
        # The gold-attention loss points at the gold when it is encoded, and at nothing when it is in the prompt.
        assert (example.gold_chunk is None) == in_prompt
        assert in_prompt or target in example.chunks[example.gold_chunk]
    assert 0.3 < gold_in_prompt / len(examples) < 0.65  # half the time, whatever N (not more with N > 1)
    passages = [Passage(i, f"{name} text.", title=name) for i, name in enumerate(["Alpha", "Beta", "Gamma"])]
    built = builder.qa("What is alpha?", "text", passages)
    assert built.prompt_ids == reader.prepare("What is alpha?", passages).ids
    assert built.chunks == [p.as_prompt_text() for p in passages[n_prompt:]]
