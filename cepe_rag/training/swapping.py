"""Entity-swapped reading practice: real corpus passages with their names replaced by invented ones.

After Longpre et al. (2021, "Entity-based knowledge conflicts"): an article's subject and the answer of a
question asked of it are replaced, consistently in every passage of the example, by invented names (or other
years and numbers), so the decoder's memory cannot answer and the text is still real prose, not one template.
The distractors are the passages a retriever finds for the original sentence, so near-topic passages stay in.
Every passage of an example is disguised the same way (its subject and about half of its other names invented),
so "the passage with invented names" and "the invented word" point at nothing: a reader must match the question.

Kept apart from the own-documents benchmark (`cepe_rag.eval.owndocs`): its invented names are built from
syllables without the letters c, j and w, and every name made here has one of them, so no name is shared;
the questions are the corpus's own sentences asked in place, none of the benchmark's templates.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from cepe_rag.training.corpus import Article
from cepe_rag.training.examples import BLANK, TrainingQuestion, cloze_candidates, question_from_cloze, sentences
from cepe_rag.types import Passage

ONSETS = ["c", "ch", "cl", "j", "w", "wh", "k", "m", "n", "l", "t", "d", "p", "s", "r", "v"]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "au", "ie"]
CODAS = ["", "", "", "n", "l", "r", "c", "m", "s", "w"]
MARKED = set("cjw")  # the letters the own-documents names never contain
_YEAR = re.compile(r"1\d{3}|20\d{2}")
_NUMBER = re.compile(r"[\d,.]+")
_WORD = re.compile(r"[A-Z][\w'’\-.]*")
_NAME = re.compile(r"(?<=[a-z,;] )[A-Z][\w'’\-]*")  # capitalised inside a sentence: a name, mostly
NAME_SHARE = 0.5  # of a passage's other names, the share that is invented too
SKIP_WORDS = {"The", "A", "An", "Of", "And", "De", "Von", "Van", "In", "On", "At", "For", "To"}


class SwapNames:
    """Invented capitalised words, each with a c, j or w, never a word of `forbidden` (lower-cased)."""

    def __init__(self, rng: random.Random, forbidden: set[str]):
        self.rng = rng
        self.forbidden = forbidden

    def word(self) -> str:
        while True:
            n = self.rng.choice((2, 2, 2, 3))
            word = "".join(self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + self.rng.choice(CODAS) for _ in range(n))
            if MARKED & set(word) and 4 <= len(word) <= 10 and word not in self.forbidden:
                return word.capitalize()


def _other_number(span: str, rng: random.Random) -> str:
    if _YEAR.fullmatch(span):
        year = int(span)
        return str(rng.choice([y for y in range(max(1000, year - 60), min(2030, year + 60)) if y != year]))
    digits = re.sub(r"\D", "", span)
    for _ in range(20):
        other = str(rng.randint(10 ** (len(digits) - 1) if len(digits) > 1 else 1, 10 ** len(digits) - 1))
        if other != digits:
            return f"{int(other):,}" if "," in span else other
    return str(int(digits or 0) + 1)


def subject_words(title: str) -> list[str]:
    """The title's name words (a parenthesised qualifier such as "(film)" left out)."""
    title = re.sub(r"\s*\(.*?\)\s*$", "", title)
    return [w for w in _WORD.findall(title) if w not in SKIP_WORDS and len(w) >= 3]


def swap_mapping(title: str, span: str, names: SwapNames, rng: random.Random) -> dict[str, str]:
    """Old word or number -> new one: the subject's name words and the answer span."""
    mapping = {word: names.word() for word in subject_words(title)}
    if _NUMBER.fullmatch(span):
        mapping[span] = _other_number(span, rng)
    else:
        for word in _WORD.findall(span):
            if word not in SKIP_WORDS and word not in mapping:
                mapping[word] = names.word()
    return mapping


def disguise_mapping(text: str, names: SwapNames, rng: random.Random, keep: dict[str, str],
                     share: float = NAME_SHARE) -> dict[str, str]:
    """Invented names for about `share` of the names inside the sentences of `text` that `keep` does not map."""
    found = {w for w in _NAME.findall(text) if w not in SKIP_WORDS and len(w) >= 3}
    return {word: names.word() for word in sorted(found) if word not in keep and rng.random() < share}


def disguise(passage: Passage, mapping: dict[str, str], names: SwapNames, rng: random.Random) -> Passage:
    """A distractor written as the gold is: the example's mapping, plus invented names for its own subject and
    about half of its other names."""
    own = {word: names.word() for word in subject_words(passage.title) if word not in mapping}
    own = {**disguise_mapping(passage.text, names, rng, {**mapping, **own}), **own, **mapping}
    return Passage(passage.id, apply_mapping(passage.text, own), title=apply_mapping(passage.title, own))


def apply_mapping(text: str, mapping: dict[str, str]) -> str:
    if not mapping:
        return text
    pattern = re.compile(r"(?<![\w'’])(" + "|".join(re.escape(k) for k in sorted(mapping, key=len, reverse=True))
                         + r")(?=['’]s\b|[^\w'’]|$)")  # a possessive is the name too: "Nile's" -> "Chawo's"
    return pattern.sub(lambda m: mapping[m.group(1)], text)


def swapped_question(article: Article, names: SwapNames, rng: random.Random) -> tuple[TrainingQuestion, dict] | None:
    """A question asked of the swapped article (its answer swapped too), with the mapping to apply to the other
    passages of the example; None when the article offers no span whose swap changes the answer."""
    made = swapped_questions(article, names, rng)
    return (made[0][0], made[1]) if made else None


def swapped_questions(article: Article, names: SwapNames, rng: random.Random, count: int = 1,
                      short_share: float = 0.0) -> tuple[list[TrainingQuestion], dict] | None:
    """Up to `count` questions asked of one swapped article, each of a different span (so only the question says
    which fact is wanted), under one mapping (to apply to the other passages of their examples too), and the
    original sentence of each (what its distractors are retrieved for); None when no span's swap changes its answer.

    A share `short_share` of them is asked short (`short_question`) rather than as the whole sentence in place."""
    candidates = cloze_candidates(article)
    rng.shuffle(candidates)
    title_words = subject_words(article.title)
    mapping = {word: names.word() for word in title_words}
    mapping = {**disguise_mapping(article.text, names, rng, mapping), **mapping}
    subject = {mapping[word] for word in title_words}
    subject_name = apply_mapping(re.sub(r"\s*\(.*?\)\s*$", "", article.title), mapping)
    chosen: list[tuple[str, str, bool]] = []  # (blanked sentence, span, asked short)
    for blanked, span in candidates:
        if len(chosen) == count:
            break
        if any(span in other or other in span for _, other, _ in chosen):
            continue  # each question asks for a fact of its own
        trial = {**mapping, **swap_mapping(article.title, span, names, rng)}
        trial.update({word: mapping[word] for word in title_words})  # the subject keeps one name
        gold_text = apply_mapping(article.text, trial)
        if apply_mapping(span, trial) == span or any(
                apply_mapping(other, trial) != apply_mapping(other, mapping) for _, other, _ in chosen):
            continue
        short = short_share > 0 and rng.random() < short_share
        if not _ask(blanked, span, short, trial, subject, subject_name, gold_text):
            continue
        mapping = trial
        chosen.append((blanked, span, short))
    gold = Passage(0, apply_mapping(article.text, mapping), title=apply_mapping(article.title, mapping))
    # Asked under the final mapping, so a question never shows a name its passage no longer has.
    asked = [(_ask(blanked, span, short, mapping, subject, subject_name, gold.text), blanked, span)
             for blanked, span, short in chosen]
    questions, queries = [], []
    for made, blanked, span in asked:
        if made:
            questions.append(TrainingQuestion(made[0], [made[1]], gold=gold))
            queries.append(blanked.replace(BLANK, span))  # the original sentence: what distractors are retrieved for
    return (questions, {"mapping": mapping, "queries": queries}) if questions else None


def _ask(blanked: str, span: str, short: bool, mapping: dict[str, str], subject: set[str], subject_name: str,
         gold_text: str) -> tuple[str, str] | None:
    """(question, answer) for a span under `mapping`, or None when the answer is not in the swapped passage, is the
    subject itself, or the question does not name the subject (so it cannot say which passage it asks about).

    Never the subject: a fifth of the spans were the article's own name ("What is an accumulation of ...?" ->
    "Peat"), and a reader trained on them answered the subject's name whatever it was asked ("Who designed the
    Virkdeisund Bridge?" -> "The Virkdeisund")."""
    answer = apply_mapping(span, mapping)
    if answer not in gold_text or any(name in answer for name in subject):
        return None
    asked = apply_mapping(blanked, mapping)
    question = (short and short_question(asked, answer, subject_name)) or question_from_cloze(asked, answer)
    return (question, answer) if BLANK not in question and any(name in question for name in subject) else None


_CLAUSE_BREAK = re.compile(r"[,;:()\"]|[.!?]\s")
_LOOSE_ENDS = {"a", "an", "the", "and", "or", "of", "in", "on", "at", "to", "by", "for", "with", "from", "as"}


def short_question(asked: str, answer: str, subject: str, before: int = 5, after: int = 3) -> str | None:
    """The blanked sentence cut to the words next to the blank, after the subject's name ("Chawo Bridge: was
    designed by what in 1858?"): a question as short as a user's, that shares only the relation's few words with
    the passage, so matching the whole sentence cannot find the answer. None when the blank has no words beside it."""
    left, _, right = asked.partition(BLANK)
    left_words = _CLAUSE_BREAK.split(left)[-1].split()[-before:]
    if len(left_words) < 2:
        left_words = _CLAUSE_BREAK.sub(" ", left).split()[-before:]
    right_words = _CLAUSE_BREAK.split(right)[0].split()[:after]
    while right_words and right_words[-1].lower() in _LOOSE_ENDS:
        right_words.pop()
    if not left_words and not right_words:
        return None
    phrase = question_from_cloze(BLANK, answer).removesuffix("?")
    words = [*left_words, phrase[0].lower() + phrase[1:], *right_words]
    return f"{subject}: {' '.join(words).rstrip(' .;:!')}?"


def curriculum_counts(n: int, min_passages: int, max_passages: int, rng: random.Random,
                      curriculum: bool = True) -> list[int]:
    """Passages per example, in training order. With the curriculum the largest count grows linearly over the
    first half of the examples (from min to max) and stays at max after; three examples in four draw from the
    upper half of the current range (the test k is where the reader must be good), one in four from all of it."""
    counts = []
    for i in range(n):
        upper = min_passages + round((max_passages - min_passages) * min(1.0, 2 * i / max(1, n))) if curriculum \
            else max_passages
        low = min_passages if rng.random() < 0.25 else max(min_passages, (upper + 1) // 2)
        counts.append(rng.randint(low, upper))
    return counts


def build_swapped_examples(stage: str, articles: Sequence[Article], builder, retrieve, *, min_passages: int,
                           max_passages: int, forbidden: set[str], curriculum: bool = True,
                           questions_per_article: int = 1, short_questions: float = 0.0):
    """`find` or `swap` examples, in curriculum order (the trainer keeps it when its config says so):

    - find: "What does the document titled <invented title> say first?" -> its first sentence, copied; the
      swapped article among passages retrieved for its first sentence (learn to pick one passage, then copy);
    - swap: a sentence of the swapped article asked in place -> the swapped span; the article among passages
      retrieved for the original sentence (learn to answer from the passage that matches the question). With
      `questions_per_article` > 1, several examples ask one article for different facts (next to each other, so
      usually in one batch): the passage alone cannot tell the answer, the question must; `short_questions` of
      them are asked short.
    """
    rng = builder.rng
    names = SwapNames(random.Random(rng.random()), forbidden)
    items = []
    for article in articles:
        if stage == "find":
            first = sentences(article.text)[:1]
            mapping = {word: names.word() for word in subject_words(article.title)}
            if not first or not mapping:
                continue
            items.append((article, mapping, first[0], None))
        else:
            made = swapped_questions(article, names, rng, questions_per_article, short_questions)
            if made is not None:
                questions, extra = made
                items.extend((article, extra["mapping"], query, question)
                             for query, question in zip(extra["queries"], questions))
    found = retrieve([query for _, _, query, _ in items], max_passages + 2)
    counts = curriculum_counts(len(items), min_passages, max_passages, rng, curriculum)
    examples = []
    for (article, mapping, query, question), hits, n in zip(items, found, counts):
        others = [p for p in hits if p.title != article.title][: n - 1]
        distractors = [disguise(p, mapping, names, rng) for p in others]
        gold = Passage(0, apply_mapping(article.text, mapping), title=apply_mapping(article.title, mapping))
        passages = list(distractors)
        # With N passages in the prompt, the gold is the first (in the prompt) half the time, else anywhere after the
        # first N (in the encoder): the cross-attention must add what the prompt lacks and not spoil what it has.
        first_encoded = builder.prompt_passages
        if first_encoded and (rng.random() < 0.5 or len(passages) < first_encoded):
            position = 0
        else:
            position = rng.randint(first_encoded, len(passages))
        passages.insert(position, gold)
        if stage == "find":
            example = builder.find(gold.title, apply_mapping(query, mapping), passages, position)
        else:
            example = builder.qa(question.question, question.answers[0], passages, position)
        examples.append(example)
    return examples
