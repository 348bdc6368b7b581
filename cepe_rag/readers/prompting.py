"""Readers that put everything in the decoder's prompt: concatenation (standard RAG) and closed-book."""

from __future__ import annotations

from collections.abc import Sequence

from cepe_rag.readers.base import NO_CONVERSATION, PreparedPrompt, Reader, question_text
from cepe_rag.settings import MOST_RELEVANT, check_choice
from cepe_rag.types import Conversation, Passage


class ConcatReader(Reader):
    """Passages in the chat prompt, most relevant first, as many as the decoder window holds."""

    name = "concat"

    def __init__(self, model, tokenizer, *, most_relevant: str = "first", **kwargs):
        """most_relevant: where the best passage goes, `first` (right after the instruction) or `last` (right
        before the question)."""
        super().__init__(model, tokenizer, **kwargs)
        check_choice(most_relevant, MOST_RELEVANT, "most_relevant")
        self.most_relevant = most_relevant

    def prepare(self, question: str, passages: Sequence[Passage],
                conversation: Conversation = NO_CONVERSATION) -> PreparedPrompt:
        prefix, chunks, query = self.pieces(question, passages, conversation)
        self.check_fits(len(prefix) + len(query))
        budget = self.window - self.generation.max_new_tokens - len(prefix) - len(query)
        used: list[tuple[Passage, list[int]]] = []
        for passage, chunk in zip(passages, chunks):  # the most relevant that fit
            if len(chunk) > budget:
                break
            used.append((passage, chunk))
            budget -= len(chunk)
        if self.most_relevant == "last":
            used.reverse()
        ids = list(prefix) + [token for _, chunk in used for token in chunk] + query
        return PreparedPrompt(ids, [passage for passage, _ in used])


class ClosedBookReader(Reader):
    """The question alone: what the decoder knows without retrieval."""

    name = "closed-book"
    reads_passages = False
    system_prompt_default = "Answer the question. Reply with a short answer: a few words, no explanation."

    def __init__(self, model, tokenizer, **kwargs):
        kwargs.setdefault("system_prompt", self.system_prompt_default)
        super().__init__(model, tokenizer, **kwargs)

    def prepare(self, question: str, passages: Sequence[Passage],
                conversation: Conversation = NO_CONVERSATION) -> PreparedPrompt:
        ids = self.chat_ids(question_text(question), conversation)
        self.check_fits(len(ids))
        return PreparedPrompt(ids, [])
