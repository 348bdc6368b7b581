"""What the HTTP API accepts and answers: OpenAI's chat-completion shapes, plus cepe-rag's extra fields
(`k` and `passages` in a request, `sources` in a response), which standard clients send with `extra_body` and
otherwise ignore."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cepe_rag.settings import DEFAULT_K
from cepe_rag.types import MAX_QUESTION_CHARS, Passage


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything beyond is a 4xx, before it reaches the model."""

    max_body_bytes: int = 1 << 20  # the whole JSON body
    max_messages: int = 64
    max_message_chars: int = MAX_QUESTION_CHARS  # per message, as `ask` limits a question
    max_passages: int = 100
    max_passage_chars: int = 20_000
    max_stop: int = 4
    max_tokens: int = 512  # answer length ceiling; prompts are budgeted so that it always fits the window
    default_max_tokens: int = 96
    max_k: int = 100
    default_k: int = DEFAULT_K


class ApiError(Exception):
    """A request the server refuses: sent as `{"error": {...}}` with this HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class PassageIn(BaseModel):
    text: str
    title: str = ""
    source: str = ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Unknown fields (user, logprobs, presence_penalty, ...) are ignored, as other OpenAI-compatible servers do.
    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # what newer clients (ChatOpenAI) send
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    # cepe-rag's own fields
    k: int | None = None  # passages to retrieve (default: the server's --k)
    passages: list[PassageIn] | None = None  # read these instead of retrieving


class RetrieveRequest(BaseModel):
    query: str
    k: int | None = None


def passage_json(passage: Passage) -> dict:
    return {"id": passage.id, "title": passage.title, "source": passage.source, "score": passage.score,
            "dense_score": passage.dense_score, "lexical_score": passage.lexical_score, "text": passage.text}
