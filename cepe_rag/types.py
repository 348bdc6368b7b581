"""The few types every stage shares."""

from __future__ import annotations

from dataclasses import dataclass, field


class CepeRagError(Exception):
    """A problem the user can fix; the CLI prints it as one line, without a traceback."""


def passage_embedding_text(title: str, text: str) -> str:
    """What the retrieval embedder embeds for a passage (at indexing, and for the cepe reader's relevance prior)."""
    return f"{title}\n{text}" if title else text


@dataclass
class Passage:
    """A retrieved chunk of a document: what retrieval returns and readers consume."""

    id: int
    text: str
    title: str = ""
    source: str = ""
    score: float = 0.0  # the retriever's ranking score: cosine (dense), BM25 (lexical) or fused (hybrid)
    dense_score: float | None = None  # hybrid retrieval: the passage's score in each list it was found in
    lexical_score: float | None = None
    focused_text: str | None = None  # the text as a reader reads it (sentence focus reorders it); sources show `text`

    def as_prompt_text(self) -> str:
        text = self.text if self.focused_text is None else self.focused_text
        return f"Document (Title: {self.title}): {text}" if self.title else f"Document: {text}"


@dataclass
class Answer:
    text: str
    passages: list[Passage]
    reader: str
    timings: dict[str, float] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=dict)
    abstained: str | None = None  # why no passage answers it (the text then says so); None: the reader answered
    read_rule: str = ""  # which retrieved passages the reader read, and why (the relevance cutoff)


MAX_QUESTION_CHARS = 20_000


def validate_question(question: str) -> str:
    """The question, stripped; an empty or oversized one is a one-line error before any model loads."""
    question = question.strip()
    if not question:
        raise CepeRagError("the question is empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise CepeRagError(f"the question is {len(question):,} characters; at most {MAX_QUESTION_CHARS:,} are accepted")
    return question


@dataclass(frozen=True)
class Conversation:
    """What a request brings besides its question, rendered by the chat template before it: a system prompt (None:
    the reader's own) and the earlier turns as chat-template messages ({"role": "user" | "assistant", "content"})."""

    system_prompt: str | None = None
    history: tuple[dict, ...] = ()

    def then(self, question: str, answer: str) -> Conversation:
        """This conversation with one more exchange."""
        return Conversation(self.system_prompt, (*self.history, {"role": "user", "content": question},
                                                 {"role": "assistant", "content": answer}))


SYSTEM_ROLES = ("system", "developer")


def split_messages(messages: list[tuple[str, str]]) -> tuple[Conversation, str]:
    """(role, text) messages (OpenAI's roles; LangChain's mapped onto them) -> (the conversation, the question: the
    last message, which must be the user's). System messages, wherever they are, make the system prompt."""
    system = "\n".join(text for role, text in messages if role in SYSTEM_ROLES) or None
    turns = [(role, text) for role, text in messages if role not in SYSTEM_ROLES]
    if not turns or turns[-1][0] != "user":
        raise CepeRagError("the last message (after any system messages) must be the user's question")
    history = tuple({"role": "user" if role == "user" else "assistant", "content": text} for role, text in turns[:-1])
    return Conversation(system, history), turns[-1][1]
