"""Training examples for each stage of the recipe (../shared/docs/cepe.md, training-notes.md).

Every example is the same shape: encoder chunks (texts, one per chunk), then decoder token ids split into
a prompt (no loss) and a target (loss). The stages differ only in where the text comes from:

- warmup:   the encoder sees the very text the decoder predicts, cut into chunks (learn to find and copy);
- standard: the first part of an article (among other articles) in the encoder, the rest in the decoder;
- read:     "reading with distractors": a sentence of an article with a span blanked, the article among
            passages retrieved for that sentence; the decoder answers the span, in the reader's chat prompt;
- ceped:    the read examples plus the teacher's top-k distribution (the frozen decoder with the same
            passages in its prompt), for distillation;
- qa:       real questions with the passages a retriever finds for them (k drawn from a range), the question
            in the reader's chat prompt, the short gold answer as the target;
- find:     an entity-swapped article among retrieved passages, its first sentence copied when asked for by
            its (invented) title: pick one passage among many, then copy (`cepe_rag.training.swapping`);
- swap:     a question asked of an entity-swapped article among retrieved passages, its swapped span the
            answer: memory cannot answer, only reading can.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cepe_rag.eval.metrics import answer_in_passages
from cepe_rag.files import atomic_write
from cepe_rag.readers.answer_kinds import PRONOUNS
from cepe_rag.readers.base import passage_block, question_text
from cepe_rag.settings import check_choice
from cepe_rag.training.corpus import Article
from cepe_rag.types import CepeRagError, Passage

STAGES = ("warmup", "standard", "read", "ceped", "qa", "find", "swap")
UNANSWERABLE_POLICIES = ("skip", "keep")
BLANK = "_____"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
# Spans worth asking for: numbers and years, and runs of capitalised words (names, places, titles).
_SPAN = re.compile(r"\b\d[\d,.]*\d\b|\b\d\b|\b[A-Z][\w'’\-.]*(?:\s+(?:of|the|de|von|van|and|&)?\s*[A-Z][\w'’\-.]*)*")
# Common-noun answers ("an award for typography", "known for the Hodge conjecture", "a maker of wind pumps"): the
# one or two words a preposition's phrase ends a clause with, the last lower-case. The name spans above never ask
# for these, and a reader trained only on them answers "what does it make" with a name.
_PHRASE = re.compile(r"\b(?:for|of|in|on|as|into|from|with|about|by|at)\s+((?:(?:the|a|an)\s+)?"
                     r"((?:[A-Za-z][\w'’\-]*\s+)?[a-z][a-z\-]{2,}))(?=\s*(?:[,;:]|\.?$))")
_NOT_ANSWER_WORDS = PRONOUNS | {
    "that", "which", "whom", "what", "itself", "himself", "herself", "themselves", "our", "your", "my",  # pointers
    "one", "others", "all", "both", "each", "other", "such", "most", "more", "many", "much", "some", "several",
    "as", "and", "or", "of", "in", "on", "for", "by", "with", "at", "to", "from", "into", "about", "than",
    "particular", "general", "addition", "total", "fact", "order", "part", "use", "time", "example", "contrast",
    "turn", "practice", "place"}  # "in particular", "for example": set phrases, not facts


@dataclass
class TrainingExample:
    chunks: list[str]
    prompt_ids: list[int]
    target_ids: list[int]
    question: str = ""  # read/ceped: the user turn without passages (the teacher's prompt adds them)
    teacher_ids: list[list[int]] = field(default_factory=list)  # per target token: top-k token ids
    teacher_probs: list[list[float]] = field(default_factory=list)  # their probabilities (rest = 1 - sum)
    gold_chunk: int | None = None  # which of `chunks` holds the answer (the gold-attention loss), if one does

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


@dataclass(frozen=True)
class TrainingQuestion:
    question: str
    answers: list[str]
    gold: Passage | None = None  # a question generated from the corpus: the passage it was asked of


def save_examples(examples: Sequence[TrainingExample], path: Path) -> None:
    """JSONL: a first line with every distinct chunk text once, then one example a line whose chunks are
    positions in it (the same passage recurs in many examples; stored once, a run folder stays small)."""
    positions: dict[str, int] = {}
    rows = []
    for example in examples:
        row = asdict(example)
        row["chunks"] = [positions.setdefault(text, len(positions)) for text in example.chunks]
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    header = json.dumps({"chunk_texts": list(positions)}, ensure_ascii=False) + "\n"
    atomic_write(path, (header + "".join(rows)).encode())


def load_examples(path: Path) -> list[TrainingExample]:
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line]
        texts = lines.pop(0)["chunk_texts"] if lines and "chunk_texts" in lines[0] else None
        examples = [TrainingExample(**row) for row in lines]
        if texts is not None:
            for example in examples:
                example.chunks = [texts[i] for i in example.chunks]
        return examples
    except (json.JSONDecodeError, TypeError, KeyError, IndexError) as error:
        raise CepeRagError(f"{path}: not a training-examples file ({error}); delete it to rebuild") from None


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def split_words(text: str, parts: int) -> list[str]:
    """`text` in `parts` consecutive pieces of about equal length, cut between words."""
    words = text.split()
    size = max(1, -(-len(words) // parts))
    return [" ".join(words[i:i + size]) for i in range(0, len(words), size)]


def cloze(article: Article, rng: random.Random) -> tuple[str, str] | None:
    """(sentence with one span blanked, the span), or None when the article has no usable span."""
    candidates = cloze_candidates(article)
    return rng.choice(candidates) if candidates else None


def _askable_sentences(article: Article) -> list[str]:
    """The article's sentences long enough to ask about and short enough to be one fact (6 to 60 words)."""
    return [sentence for sentence in sentences(article.text) if 6 <= len(sentence.split()) <= 60]


def cloze_candidates(article: Article) -> list[tuple[str, str]]:
    """Every (sentence with one span blanked, the span) the article offers."""
    candidates = []
    for sentence in _askable_sentences(article):
        for match in _SPAN.finditer(sentence):
            span = match.group().strip(" .,")
            # Skip a sentence's first word (capitalised anyway) unless it is the article's subject.
            if len(span) < 2 or (match.start() == 0 and " " not in span and span != article.title):
                continue
            start = match.start() + match.group().index(span)  # this match, not an earlier "Japan" in "Japanese"
            candidates.append((sentence[:start] + BLANK + sentence[start + len(span):], span))
    return candidates


def phrase_candidates(article: Article) -> list[tuple[str, str]]:
    """Every (question, common-noun answer) the article offers: a clause-final prepositional phrase asked in place
    ("A warehouse is a building for storing goods." -> "A warehouse is a building for what?", "storing goods")."""
    candidates = []
    for sentence in _askable_sentences(article):
        for match in _PHRASE.finditer(sentence):
            answer = match.group(2)
            if any(word.lower() in _NOT_ANSWER_WORDS for word in answer.split()):
                continue
            question = sentence[:match.start(1)] + "what" + sentence[match.end(1):]
            candidates.append((question.rstrip(" .;:!") + "?", answer))
    return candidates


def question_from_cloze(blanked: str, span: str) -> str:
    """A blanked sentence asked in place ("Kubrick directed it in _____." -> "Kubrick directed it in what
    year?"): the span's kind picks the question word; the answer is the span."""
    if re.fullmatch(r"1\d{3}|20\d{2}", span):
        phrase = "what year"
    elif re.fullmatch(r"[\d,.]+", span):
        phrase = "how much" if blanked.split(BLANK)[0].rstrip().endswith(("$", "£", "€")) else "what number"
    else:
        phrase = "what"
    if blanked.startswith(BLANK):
        phrase = phrase[0].upper() + phrase[1:]
    return blanked.replace(BLANK, phrase, 1).rstrip(" .;:!") + "?"


def corpus_questions(articles: Sequence[Article], rng: random.Random, per_article: int = 2, *,
                     phrases: bool = False) -> list[TrainingQuestion]:
    """Questions asked of the corpus itself (up to `per_article` spans of each article, asked in place), each
    with the article as its gold passage: reading practice with a known answer, in question form. The spans are
    names and numbers, or with `phrases` the common nouns that end a clause (`phrase_candidates`)."""
    questions = []
    for article in articles:
        if phrases:
            candidates = phrase_candidates(article)
        else:
            candidates = [(question_from_cloze(blanked, span), span) for blanked, span in cloze_candidates(article)]
        for question, answer in rng.sample(candidates, min(per_article, len(candidates))):
            gold = Passage(0, article.text, title=article.title)
            questions.append(TrainingQuestion(question, [answer], gold=gold))
    return questions


class ExampleBuilder:
    """Turns articles into examples; `prompt_ids(user_text)` is the reader's own chat prompt, so the
    trained model sees at training time exactly what it sees when answering."""

    def __init__(self, decoder_tokenizer, prompt_ids: Callable[[str], list[int]], *, max_decoder_tokens: int = 256,
                 seed: int = 0, prompt_passages: int = 0):
        """prompt_passages: find/swap/qa put their first N passages in the prompt, as `cepe --n-prompt-passages N`
        reads them (the paper's split), and the rest through the encoder."""
        self.prompt_passages = prompt_passages
        self.tokenizer = decoder_tokenizer
        self.prompt_ids = prompt_ids
        self.max_decoder_tokens = max_decoder_tokens
        self.rng = random.Random(seed)
        self.bos = [decoder_tokenizer.bos_token_id] if decoder_tokenizer.bos_token_id is not None else []
        self.end_ids = self.tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"] if \
            "<|im_end|>" in self.tokenizer.get_vocab() else [self.tokenizer.eos_token_id]

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def warmup(self, article: Article, n_chunks: int = 4) -> TrainingExample:
        text = self.tokenizer.decode(self._tokens(article.text)[: self.max_decoder_tokens])
        return TrainingExample(split_words(text, n_chunks), self.bos, self._tokens(text))

    def standard(self, article: Article, distractors: Sequence[Passage]) -> TrainingExample | None:
        parts = sentences(article.text)
        if len(parts) < 2:
            return None
        cut = max(1, len(parts) // 2)
        head, tail = " ".join(parts[:cut]), " ".join(parts[cut:])
        chunks = [Passage(0, head, title=article.title).as_prompt_text()] + [p.as_prompt_text() for p in distractors]
        self.rng.shuffle(chunks)
        return TrainingExample(chunks, self.bos, self._tokens(tail)[: self.max_decoder_tokens])

    def read(self, article: Article, blanked: str, span: str, distractors: Sequence[Passage]) -> TrainingExample:
        gold = Passage(0, article.text, title=article.title)
        chunks = [p.as_prompt_text() for p in [gold, *distractors]]
        self.rng.shuffle(chunks)
        question = question_text(f"Fill in the blank: {blanked}")
        return TrainingExample(chunks, self.prompt_ids(question), self._tokens(span) + self.end_ids, question)

    def split(self, user_turn: str, passages: Sequence[Passage]) -> tuple[list[int], list[str]]:
        """The prompt (the first `prompt_passages` passages ahead of the user turn, as CepeReader.prepare writes
        them) and the encoder's chunks (the rest)."""
        in_prompt, rest = passages[: self.prompt_passages], passages[self.prompt_passages:]
        documents = "".join(passage_block(p.as_prompt_text()) for p in in_prompt)
        return self.prompt_ids(documents + user_turn), [p.as_prompt_text() for p in rest]

    def encoded_position(self, gold: int | None) -> int | None:
        """Where passage `gold` (an index into an example's passages) lands among the encoder's chunks; None when
        it is in the prompt or unknown."""
        return gold - self.prompt_passages if gold is not None and gold >= self.prompt_passages else None

    def find(self, title: str, first_sentence: str, passages: Sequence[Passage],
             gold: int | None = None) -> TrainingExample:
        user_turn = f'Copy the first sentence of the document titled "{title}".'
        prompt, chunks = self.split(user_turn, passages)
        return TrainingExample(chunks, prompt, self._tokens(first_sentence)[: self.max_decoder_tokens] + self.end_ids,
                               user_turn, gold_chunk=self.encoded_position(gold))

    def qa(self, question: str, answer: str, passages: Sequence[Passage], gold: int | None = None) -> TrainingExample:
        user_turn = question_text(question)
        prompt, chunks = self.split(user_turn, passages)
        return TrainingExample(chunks, prompt, self._tokens(answer) + self.end_ids, user_turn,
                               gold_chunk=self.encoded_position(gold))


Retrieve = Callable[[list[str], int], list[list[Passage]]]


def build_qa_examples(questions: Sequence[TrainingQuestion], builder: ExampleBuilder, retrieve: Retrieve, *,
                      min_passages: int = 5, max_passages: int = 50,
                      unanswerable: str = "skip") -> list[TrainingExample]:
    """One example per question, reading between min_passages and max_passages retrieved passages (drawn per
    question, so the reader learns every k). The target is the gold answer the passages contain; a question
    whose passages hold no gold answer is skipped (`skip`) or kept with its first gold answer (`keep`: the
    model then also learns to answer from memory)."""
    check_choice(unanswerable, UNANSWERABLE_POLICIES, "policy")
    if not 1 <= min_passages <= max_passages:
        raise CepeRagError(f"passages per question: need 1 <= {min_passages} <= {max_passages}")
    found = retrieve([q.question for q in questions], max_passages)
    examples = []
    for question, hits in zip(questions, found):
        passages = hits[: builder.rng.randint(min_passages, max_passages)]
        gold = None
        if question.gold is not None:  # a generated question: its article replaces a retrieved passage
            passages = [p for p in passages if p.title != question.gold.title][: len(passages) - 1]
            gold = builder.rng.randint(0, len(passages))
            passages.insert(gold, question.gold)
        texts = [f"{p.title} {p.text}" for p in passages]
        present = [answer for answer in question.answers if answer_in_passages(texts, [answer])]
        if not present and unanswerable == "skip":
            continue
        examples.append(builder.qa(question.question, (present or question.answers)[0], passages, gold))
    return examples


def build_examples(stage: str, articles: Sequence[Article], builder: ExampleBuilder, *,
                   retrieve: Retrieve | None = None, max_passages: int = 20) -> list[TrainingExample]:
    """One example per usable article. Distractors come from `retrieve` (passages a retriever finds for
    the article's text: realistic ones) or, without it, from random other articles; their number varies
    from 0 to max_passages - 1 so the model learns to read a few passages as well as many."""
    if stage not in STAGES:
        raise CepeRagError(f"unknown stage {stage!r}; choose one of: {', '.join(STAGES)}")
    rng = builder.rng
    if stage == "warmup":
        return [builder.warmup(a) for a in articles]
    items = [(a, cloze(a, rng)) for a in articles] if stage in ("read", "ceped") else [(a, None) for a in articles]
    items = [(a, c) for a, c in items if c is not None or stage == "standard"]
    counts = [rng.randint(0, max_passages - 1) for _ in items]
    queries = [c[0] if c else a.text[:300] for a, c in items]
    if retrieve is not None:
        found = retrieve(queries, max_passages + 2)
    else:
        pool = list(articles)
        found = [[Passage(0, x.text, title=x.title) for x in rng.sample(pool, min(len(pool), max_passages + 2))]
                 for _ in items]
    examples = []
    for (article, item), n, hits in zip(items, counts, found):
        distractors = [p for p in hits if p.title != article.title][:n]
        if stage == "standard":
            example = builder.standard(article, distractors)
        else:
            example = builder.read(article, *item, distractors)
        if example is not None and example.target_ids:
            examples.append(example)
    return examples
