"""LangChain adapters: an LLM, a chat model and a retriever over cepe-rag (langchain-core 1.x).

Passages travel as a `contexts=` keyword (or `.bind(contexts=...)`), never inside the prompt text, so
the reader can encode them however it reads them (in parallel, through CEPE's encoder, ...).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel, BaseLLM
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk, LLMResult
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnableParallel, RunnablePassthrough
from pydantic import ConfigDict, Field, model_validator

from cepe_rag.indexes import open_store
from cepe_rag.indexes.layout import check_store_options
from cepe_rag.models import default_device, load_embedder
from cepe_rag.pipelines.session import RagSession
from cepe_rag.readers import GenerationConfig
from cepe_rag.readers.base import SYSTEM_PROMPT
from cepe_rag.retrieval import PassageFilter, Retriever
from cepe_rag.settings import DEFAULT_ANSWER_TOKENS, DEFAULT_DECODER, DEFAULT_K, DEFAULT_RETRIEVAL, ReaderSpec
from cepe_rag.types import Conversation, Passage, split_messages

ContextLike = str | Document | Passage


@lru_cache(maxsize=8)
def _load_retriever(index: str, embedder: str | None, mode: str = DEFAULT_RETRIEVAL,
                    filters: PassageFilter | None = None, qdrant_url: str | None = None,
                    qdrant_path: str | None = None, qdrant_collection: str | None = None):
    """Opened once per setting (the manifest read and the store options checked then, not at every query)."""
    qdrant = check_store_options(Path(index), None, qdrant_url, qdrant_path, qdrant_collection)
    return Retriever(open_store(index, qdrant), embedder=load_embedder(embedder) if embedder else None, mode=mode,
                     filters=filters)


def to_passages(contexts: Sequence[ContextLike]) -> list[Passage]:
    passages = []
    for position, context in enumerate(contexts):
        if isinstance(context, Passage):
            passages.append(context)
        elif isinstance(context, Document):
            meta = context.metadata or {}
            passages.append(Passage(id=meta.get("id", position), text=context.page_content,
                                    title=str(meta.get("title", "")), source=str(meta.get("source", "")),
                                    score=float(meta.get("score", 0.0)), dense_score=meta.get("dense_score"),
                                    lexical_score=meta.get("lexical_score")))
        else:
            passages.append(Passage(id=position, text=str(context)))
    return passages


def to_documents(passages: Sequence[Passage]) -> list[Document]:
    return [Document(page_content=p.text, metadata={"id": p.id, "title": p.title, "source": p.source,
                                                    "score": p.score, "dense_score": p.dense_score,
                                                    "lexical_score": p.lexical_score}) for p in passages]


class CepeRetriever(BaseRetriever):
    """Retrieval over a cepe-rag index folder (hybrid, dense or lexical; optional source/title globs); scores
    and sources in each Document's metadata. A Qdrant index folder is found through its manifest; `qdrant_url`,
    `qdrant_path` or `qdrant_collection` say where its collection is reached from here instead."""

    index: str
    k: int = DEFAULT_K
    embedder: str | None = None
    mode: str = DEFAULT_RETRIEVAL
    source: str | None = None
    title: str | None = None
    qdrant_url: str | None = None
    qdrant_path: str | None = None
    qdrant_collection: str | None = None

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None) -> list[Document]:
        return to_documents(self._retriever().retrieve(query, k or self.k))

    def settings(self) -> tuple:
        """What opens its retriever (a cache key)."""
        return (str(self.index), self.embedder, self.mode, PassageFilter(source=self.source, title=self.title),
                self.qdrant_url, self.qdrant_path, self.qdrant_collection)

    def _retriever(self) -> Retriever:
        return _load_retriever(*self.settings())

    def store(self):
        return self._retriever().store


class CepeLLM(BaseLLM):
    """A frozen decoder reading retrieved passages with one of cepe-rag's readers, through the same RagSession as
    `ask` and `serve`: passages from `contexts=`, from `retriever`, or none; with a CepeRetriever, a question no
    indexed passage answers gets "not in the documents" (`abstain=False` reads anyway).

    `spec` is the whole ReaderSpec; its fields may also be given one by one (`CepeLLM(reader="cepe",
    n_prompt_passages=1)`, `CepeLLM(ape_scale=0.5, reader="parallel")`)."""

    spec: ReaderSpec = Field(default_factory=ReaderSpec)
    max_tokens: int = DEFAULT_ANSWER_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    system_prompt: str = SYSTEM_PROMPT
    retriever: BaseRetriever | None = None
    k: int = DEFAULT_K
    abstain: bool = True
    device: str | None = None
    dtype: str | None = Field(default=None, description="float32, bfloat16 or float16; None: the CLI's default "
                                                        "(CEPE_RAG_DTYPE, else bfloat16 where computed natively).")
    timeout: float | None = Field(default=None, description="Accepted for interface compatibility; unused.")
    max_retries: int = Field(default=0, description="Accepted for interface compatibility; unused.")

    model_config = ConfigDict(arbitrary_types_allowed=True)

    @model_validator(mode="before")
    @classmethod
    def gather_spec(cls, values: Any) -> Any:
        """ReaderSpec's fields given one by one become (or amend) `spec`."""
        if isinstance(values, dict):
            names = {f.name for f in fields(ReaderSpec)}
            given = {name: values.pop(name) for name in list(values) if name in names}
            if given:
                values["spec"] = replace(values.get("spec") or ReaderSpec(), **given)
        return values

    @classmethod
    def from_model_id(cls, model_id: str = DEFAULT_DECODER, **kwargs: Any) -> CepeLLM:
        return cls(decoder=model_id, **kwargs)

    @classmethod
    def from_index(cls, index: str, *, k: int = DEFAULT_K, embedder: str | None = None, **kwargs: Any) -> CepeLLM:
        return cls(retriever=CepeRetriever(index=str(index), k=k, embedder=embedder), k=k, **kwargs)

    @property
    def _llm_type(self) -> str:
        return "cepe-rag"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {**asdict(self.spec), "dtype": self.dtype, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "k": self.k}

    def session(self) -> RagSession:
        """The session these settings describe, loaded once per process (models are shared between sessions)."""
        index = self.retriever.settings() if isinstance(self.retriever, CepeRetriever) else None
        return _session(self.spec, self.device or default_device(), self.dtype, self.max_tokens, index,
                        self.abstain, self.k)

    def own_passages(self, prompt: str, contexts: Sequence[ContextLike] | None) -> list[Passage] | None:
        """The passages a call brings (contexts=, or another LangChain retriever's); None: the session retrieves."""
        if contexts is not None:
            return to_passages(contexts)
        if self.retriever is not None and not isinstance(self.retriever, CepeRetriever):
            return to_passages(self.retriever.invoke(prompt)[: self.k])
        return None

    def _generation(self, stop: list[str] | None) -> dict[str, Any]:
        return {"stop_strings": tuple(stop if stop is not None else (self.stop or [])), "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed}

    def _conversation(self, conversation: Conversation | None) -> Conversation:
        conversation = conversation or Conversation()
        return replace(conversation, system_prompt=conversation.system_prompt or self.system_prompt)

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, *,
                  contexts: Sequence[ContextLike] | None = None, conversation: Conversation | None = None,
                  **kwargs: Any) -> LLMResult:
        session = self.session()
        generations = []
        for prompt in prompts:
            answer = session.answer(prompt, passages=self.own_passages(prompt, contexts),
                                    conversation=self._conversation(conversation), **self._generation(stop))
            generations.append([GenerationChunk(text=answer.text, generation_info={
                "sources": [p.source for p in answer.passages], "passages_read": answer.usage.get("passages_read", 0),
                "read_rule": answer.read_rule, "abstained": answer.abstained, "timings": answer.timings})])
        return LLMResult(generations=generations)

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, *,
                contexts: Sequence[ContextLike] | None = None, conversation: Conversation | None = None,
                **kwargs: Any) -> Iterator[GenerationChunk]:
        for item in self.session().stream(prompt, passages=self.own_passages(prompt, contexts),
                                          conversation=self._conversation(conversation), **self._generation(stop)):
            if isinstance(item, str):
                chunk = GenerationChunk(text=item)
                if run_manager:
                    run_manager.on_llm_new_token(item, chunk=chunk)
                yield chunk


@lru_cache(maxsize=8)
def _session(spec: ReaderSpec, device: str, dtype: str | None, max_tokens: int, index: tuple | None, abstain: bool,
             k: int) -> RagSession:
    retriever = _load_retriever(*index) if index else None
    return RagSession.open(None, [spec], retriever=retriever, device=device, dtype=dtype, abstain=abstain, k=k,
                           generation=GenerationConfig(max_new_tokens=max_tokens))


class ChatCepe(BaseChatModel):
    """Chat model over CepeLLM: system messages become the system prompt, earlier turns a transcript."""

    llm: CepeLLM = Field(default_factory=CepeLLM)

    def __init__(self, llm: CepeLLM | None = None, **kwargs: Any):
        # Standard chat-model parameters (temperature, max_tokens, stop, ...) configure the wrapped LLM.
        llm_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in CepeLLM.model_fields}
        super().__init__(llm=llm or CepeLLM(**llm_fields), **kwargs)

    @property
    def _llm_type(self) -> str:
        return "cepe-rag-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self.llm._identifying_params

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any):
        params = super()._get_ls_params(stop=stop, **kwargs)
        model_name = kwargs.get("model") or self.llm.spec.cepe_model or self.llm.spec.decoder
        params.update(ls_provider="cepe-rag", ls_model_name=model_name,
                      ls_temperature=self.llm.temperature, ls_max_tokens=self.llm.max_tokens)
        if stop or self.llm.stop:
            params["ls_stop"] = stop or self.llm.stop
        return params

    @staticmethod
    def split_messages(messages: list[BaseMessage]) -> tuple[Conversation, str]:
        """(the conversation: system prompt and earlier turns, the question: the last message), as the server's."""
        roles = [(("system" if isinstance(m, SystemMessage) else "user" if isinstance(m, HumanMessage)
                   else "assistant"), m.text) for m in messages]
        return split_messages(roles)

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        conversation, question = self.split_messages(messages)
        result = self.llm._generate([question], stop=stop, run_manager=run_manager, conversation=conversation,
                                    **kwargs)
        generation = result.generations[0][0]
        message = AIMessage(content=generation.text, response_metadata=generation.generation_info or {})
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        conversation, question = self.split_messages(messages)
        for chunk in self.llm._stream(question, stop=stop, conversation=conversation, **kwargs):
            message_chunk = ChatGenerationChunk(message=AIMessageChunk(content=chunk.text))
            if run_manager:
                run_manager.on_llm_new_token(chunk.text, chunk=message_chunk)
            yield message_chunk


def rag_chain(retriever: BaseRetriever, llm: CepeLLM | ChatCepe) -> Runnable:
    """question -> {"answer", "source_documents"}: retrieval by `retriever`, reading by `llm` (contexts kwarg)."""

    def read(inputs: dict) -> dict:
        answer = llm.invoke(inputs["question"], contexts=inputs["source_documents"])
        return {"answer": answer.text if isinstance(answer, BaseMessage) else answer,
                "source_documents": inputs["source_documents"]}

    return RunnableParallel(question=RunnablePassthrough(), source_documents=retriever) | RunnableLambda(read)


__all__ = ["CepeLLM", "CepeRetriever", "ChatCepe", "rag_chain", "to_documents", "to_passages"]
