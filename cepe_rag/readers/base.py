"""The reader interface: answer(question, passages) -> Answer, with token streaming."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

import torch

from cepe_rag.readers.extractive import SpanConstraint, span_constraint
from cepe_rag.readers.generation import DecodeBatch, GenerationConfig
from cepe_rag.settings import DEFAULT_PROMPT_STYLE, PROMPT_STYLES, check_choice, check_read_margin
from cepe_rag.types import Answer, CepeRagError, Conversation, Passage

NO_CONVERSATION = Conversation()

SYSTEM_PROMPT = (
    "You answer questions using the documents you are given. "
    "Reply with a short answer: a few words, no explanation."
)
# Worked examples for the `fewshot` prompt style: they show the answer format (a few words copied from a
# document). Invented, and in no benchmark.
DEMONSTRATIONS = (
    ("Document (Title: Harrowmere Lighthouse): Harrowmere Lighthouse stands on the north cape of Tessel Island. "
     "It was built in 1874 by the engineer Tobias Wrenfield and is 31 metres tall.",
     "Who built Harrowmere Lighthouse?", "Tobias Wrenfield"),
    ("Document (Title: Pellion Glass Fair): The Pellion Glass Fair is a trade fair held every spring in the town "
     "of Vardemor. It was first held in 1921 and draws glassmakers from across the region.",
     "In what year was the Pellion Glass Fair first held?", "1921"),
)


Plan = TypeVar("Plan")


@dataclass
class PreparedPrompt(Generic[Plan]):
    """One request ready for decoding: the prompt token ids, the passages the reader used, and what else its decoding
    needs, typed by its reader (`ParallelPlan`; CEPE's encoder passages; nothing for concat and closed-book)."""

    ids: list[int]
    passages: list[Passage]
    plan: Plan | None = None
    read_rule: str = ""  # which of the given passages were read, and why (the relevance cutoff)
    question: str = ""


class Reader:
    """Base class: subclasses decide how passages reach the decoder (`prepare` and `start`). A reader holds a model
    and its settings, never a request's: a conversation comes with each request (`Conversation`)."""

    name = "base"

    reads_passages = True  # False: retrieval is skipped, and the fewshot demonstrations carry no document

    def __init__(self, model, tokenizer, *, generation: GenerationConfig | None = None,
                 system_prompt: str = SYSTEM_PROMPT, prompt_style: str = DEFAULT_PROMPT_STYLE,
                 read_margin: float | None = None, focus: bool = False, extractive: bool | None = False):
        check_choice(prompt_style, PROMPT_STYLES, "prompt style")
        check_read_margin(read_margin)
        self.model = model
        self.read_margin = read_margin  # None: read every passage given (a fixed k)
        self.focus = focus  # sentence focus on the passages read: applied by the session, which has the embedder
        self.extractive = bool(extractive)  # answers are spans of the passages read (readers/extractive.py)
        self.tokenizer = tokenizer
        self.generation = generation or GenerationConfig()
        self.system_prompt = system_prompt
        self.prompt_style = prompt_style

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    # --- prompt building -------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def demonstrations(self) -> list[tuple[str, str]]:
        """(user turn, answer) pairs shown before the question: none for the `instruction` style."""
        if self.prompt_style != "fewshot":
            return []
        return [((passage_block(document) if self.reads_passages else "") + question_text(question), answer)
                for document, question, answer in DEMONSTRATIONS]

    def chat_text(self, user_text: str, conversation: Conversation = NO_CONVERSATION) -> str:
        """The chat-formatted prompt, ending where the assistant's answer starts."""
        system_prompt = conversation.system_prompt or self.system_prompt
        if self.has_chat_template:
            messages = [{"role": "system", "content": system_prompt}]
            for user, answer in self.demonstrations():
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            messages += [*conversation.history, {"role": "user", "content": user_text}]
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        shots = "".join(f"{user}\nAnswer: {answer}\n\n" for user, answer in self.demonstrations())
        shots += "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in conversation.history)
        return f"{system_prompt}\n\n{shots}{user_text}\nAnswer:"

    def tokenize(self, text: str, *, at_start: bool = False) -> list[int]:
        """Token ids of prompt text; BOS and the like only at the start of a non-chat prompt."""
        special = at_start and not self.has_chat_template
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def chat_ids(self, user_text: str, conversation: Conversation = NO_CONVERSATION) -> list[int]:
        return self.tokenize(self.chat_text(user_text, conversation), at_start=True)

    def pieces(self, question: str, passages: Sequence[Passage], conversation: Conversation = NO_CONVERSATION
               ) -> tuple[list[int], list[list[int]], list[int]]:
        """The prompt in three parts, each tokenized on its own: the prefix (system turn, demonstrations, start of
        the user turn), one token list per passage, and the question up to where the answer starts. Joined they
        are the concat reader's prompt, token for token; the parallel reader prefills the passages side by side."""
        marker = "\x00PASSAGES\x00"
        head, _, tail = self.chat_text(self.ahead_of_passages(question, passages) + marker
                                       + question_text(question), conversation).partition(marker)
        prefix, query = self.tokenize(head, at_start=True), self.tokenize(tail)
        return prefix, [self.tokenize(passage_block(p.as_prompt_text())) for p in passages], query

    def ahead_of_passages(self, question: str, passages: Sequence) -> str:
        """`query-aware`: the question before the passages as well as after them, so the decoder reads them
        knowing what it looks for (Liu et al. 2023, "Lost in the Middle")."""
        return passage_block(question_text(question)) if self.prompt_style == "query-aware" and passages else ""

    def check_fits(self, n_prompt_tokens: int) -> None:
        budget = self.window - self.generation.max_new_tokens
        if n_prompt_tokens > budget:
            raise CepeRagError(
                f"the question needs {n_prompt_tokens} prompt tokens; this decoder reads at most {budget} "
                f"(window {self.window} minus {self.generation.max_new_tokens} answer tokens): shorten it"
            )

    def prepare(self, question: str, passages: Sequence[Passage],
                conversation: Conversation = NO_CONVERSATION) -> PreparedPrompt:
        raise NotImplementedError

    def prepare_request(self, question: str, passages: Sequence[Passage],
                        conversation: Conversation | None = None) -> PreparedPrompt:
        """`prepare` on the passages the relevance cutoff keeps: those whose cosine similarity to the question is
        within `read_margin` of the best passage's (docs/retrieval.md, "Relevance cutoff"); the rule is recorded."""
        kept, rule = read_selection(passages, self.read_margin if self.reads_passages else None)
        prepared = self.prepare(question, kept, conversation or NO_CONVERSATION)
        prepared.question = question
        prepared.read_rule = rule if len(prepared.passages) == len(kept) else \
            f"{rule}; {len(prepared.passages)} fit the decoder's window"
        if any(p.focused_text is not None for p in prepared.passages):
            prepared.read_rule += "; each led by its sentence most similar to the question (sentence focus)"
        return prepared

    # --- decoding ----------------------------------------------------------------------------------

    def stream(self, question: str, passages: Sequence[Passage], *, conversation: Conversation | None = None,
               **generation) -> Iterator[str]:
        """The answer's text, delta by delta."""
        for item in self.answer_stream(question, passages, conversation=conversation, **generation):
            if isinstance(item, str):
                yield item

    def answer_stream(self, question: str, passages: Sequence[Passage], *, conversation: Conversation | None = None,
                      **generation) -> Iterator[str | Answer]:
        """The answer's text delta by delta, then the Answer itself (sources, timings, usage)."""
        prepared = self.prepare_request(question, passages, conversation)
        text, steps, started, first_token = "", 0, time.perf_counter(), None
        for deltas in self.stream_prepared([prepared], replace(self.generation, **generation)):
            steps += 1
            first_token = first_token or time.perf_counter()
            if deltas[0]:
                text += deltas[0]
                yield deltas[0]
        yield self.finished_answer(text, prepared, steps, started, first_token)

    def answer(self, question: str, passages: Sequence[Passage], *, conversation: Conversation | None = None,
               on_token: Callable[[str], None] | None = None, **generation) -> Answer:
        return self.answer_batch([question], [passages], conversations=[conversation], on_token=on_token,
                                 **generation)[0]

    def answer_batch(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]], *,
                     conversations: Sequence[Conversation | None] | None = None,
                     on_token: Callable[[str], None] | None = None, **generation) -> list[Answer]:
        """Answer several questions in one batch; on_token streams the first question's text."""
        conversations = conversations or [None] * len(questions)
        if not len(questions) == len(passages) == len(conversations):
            raise ValueError("one passage list (and conversation) per question")
        config = replace(self.generation, **generation)
        prepared = [self.prepare_request(*request) for request in zip(questions, passages, conversations)]
        texts = [""] * len(questions)
        steps = 0
        started = time.perf_counter()
        first_token = None
        for deltas in self.stream_prepared(prepared, config):
            steps += 1
            first_token = first_token or time.perf_counter()
            for row, delta in enumerate(deltas):
                texts[row] += delta
            if on_token and deltas[0]:
                on_token(deltas[0])
        return [self.finished_answer(text, prep, steps, started, first_token) for text, prep in zip(texts, prepared)]

    def finished_answer(self, text: str, prepared: PreparedPrompt, steps: int, started: float,
                        first_token: float | None) -> Answer:
        now = time.perf_counter()
        return Answer(text=text.strip(), passages=list(prepared.passages), reader=self.name,
                      timings={"first_token_s": (first_token or now) - started, "total_s": now - started},
                      usage={"prompt_tokens": len(prepared.ids), "decode_steps": steps,
                             "passages_read": len(prepared.passages)},
                      read_rule=prepared.read_rule)

    def stream_prepared(self, prepared: list[PreparedPrompt], config: GenerationConfig) -> Iterator[list[str]]:
        yield from self.start(prepared, config).stream()

    def start(self, prepared: list[PreparedPrompt], config: GenerationConfig,
              limits: list[int] | None = None) -> DecodeBatch:
        """The decoding state of these prepared requests, before its first step (`limits`: new tokens per row)."""
        return DecodeBatch(self.model, [p.ids for p in prepared], self.tokenizer, config, device=self.device,
                           limits=limits, constraints=self.span_constraints(prepared))

    def span_constraints(self, prepared: list[PreparedPrompt]) -> list[SpanConstraint] | None:
        """With extractive decoding, each request's: its answer continues a span of a passage it read (title or
        text), and does not start on a name its question mentions."""
        if not (self.extractive and self.reads_passages):
            return None
        return [span_constraint(request.question, [piece for p in self.answerable_passages(request)
                                                   for piece in (p.title, p.focused_text or p.text) if piece],
                                self.tokenizer) for request in prepared]

    def answerable_passages(self, request: PreparedPrompt) -> list[Passage]:
        """The passages an extractive answer may be a span of: all those read."""
        return request.passages


def read_selection(passages: Sequence[Passage], margin: float | None) -> tuple[list[Passage], str]:
    """(the passages to read, why): the first one (the retriever's best: hybrid ranking puts an exact name match
    first even where its cosine is not the highest) and those within `margin` of the best cosine similarity, in
    their order; all of them without a margin or without similarities (the caller's own passages, lexical
    retrieval)."""
    passages = list(passages)
    scores = [p.dense_score for p in passages if p.dense_score is not None]
    if not passages:
        return [], ""
    if margin is None or not scores:
        why = "no relevance cutoff" if margin is None else "no similarities to compare"
        return passages, f"read {len(passages)} of {len(passages)} passages ({why})"
    best = max(scores)
    kept = passages[:1] + [p for p in passages[1:] if p.dense_score is None or p.dense_score >= best - margin]
    which = "any other as similar as the best" if margin == 0 else f"those within {margin:g} of the best similarity"
    return kept, f"read {len(kept)} of {len(passages)} passages: the top-ranked and {which} ({best:.2f})"


def passage_block(text: str) -> str:
    """How one passage sits in a prompt, for every reader and for training's teacher: its text, then a blank line."""
    return text + "\n\n"


def question_text(question: str) -> str:
    return f"Question: {question}"
