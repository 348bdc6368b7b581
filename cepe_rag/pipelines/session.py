"""The question path, once for every entry point: a question (and its conversation) -> passages -> abstain or read
-> Answer with sources. `ask`, `chat`, `eval`, `serve` and the LangChain adapters all go through a RagSession."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cepe_rag.cepe.states import use_stored_states
from cepe_rag.indexes import open_store
from cepe_rag.indexes.layout import QdrantLocation
from cepe_rag.models import check_model_reference, default_device, resolve_dtype
from cepe_rag.readers import READERS, GenerationConfig, Reader, build_reader
from cepe_rag.readers.base import read_selection
from cepe_rag.retrieval import DEFAULT_ABSTENTION, Abstention, PassageFilter, Retriever, relevance
from cepe_rag.retrieval.focus import focus_passages
from cepe_rag.settings import (
    DEFAULT_K,
    DEFAULT_RETRIEVAL,
    DTYPES,
    NOT_IN_DOCUMENTS,
    RETRIEVAL_MODES,
    ReaderSpec,
    check_choice,
)
from cepe_rag.types import Answer, CepeRagError, Conversation, Passage, validate_question


@dataclass
class Retrieved:
    """A question's passages, why they are not read (None: read them), and how they were found."""

    passages: list[Passage]
    abstained: str | None = None
    query: str = ""  # what was searched for: the question, or the question with the earlier one (a follow-up)
    seconds: float = 0.0


class RagSession:
    """Readers (by label) over one retriever, loaded once: passages for a question, and its answer or "not in the
    documents". Readers hold no request state, so one session serves many conversations (the server's threads
    retrieve under a lock; its one decoder thread reads)."""

    def __init__(self, readers: dict[str, Reader] | Reader, retriever: Retriever | None = None, *,
                 abstention: Abstention | None = DEFAULT_ABSTENTION, k: int = DEFAULT_K,
                 notes: Sequence[str] = ()):
        self.readers = readers if isinstance(readers, dict) else {readers.name: readers}
        self.build_options: dict = {"device": "cpu"}  # how `add_reader` builds one (`open` records its own)
        self.retriever = retriever
        self.abstention = abstention  # None: always read
        self.k = k
        self.notes = [note for note in notes if note]
        # The query embedder's tokenizer and the SQLite connection are not safe to share between threads.
        self._retrieval_lock = threading.Lock()

    @classmethod
    def open(cls, index: str | Path | None, specs: Sequence[ReaderSpec] = (ReaderSpec(),), *,
             retriever: Retriever | None = None, retrieval: str = DEFAULT_RETRIEVAL,
             filters: PassageFilter | None = None, qdrant: QdrantLocation | None = None, device: str | None = None,
             dtype: str | None = None, generation: GenerationConfig | None = None, abstain: bool = True,
             k: int = DEFAULT_K) -> RagSession:
        """Everything set up once, from settings: the retriever over `index` (or `retriever`; neither: the caller
        brings passages), one reader per spec on `device` in `dtype` (the one rule, `models.resolve_dtype`), and the
        index's stored CEPE states where a reader can use them."""
        cls.check(specs, dtype=dtype, retrieval=retrieval, k=k)
        if len({spec.label for spec in specs}) < len(specs):
            raise CepeRagError(f"a reader is listed twice: {', '.join(spec.label for spec in specs)}")
        if retriever is None and index is not None:
            retriever = Retriever(open_store(index, qdrant), mode=retrieval, filters=filters)
        device = device or default_device()
        torch_dtype = resolve_dtype(dtype, device)
        session = cls({}, retriever, abstention=DEFAULT_ABSTENTION if abstain else None, k=k)
        session.build_options = {"generation": generation, "device": device, "dtype": torch_dtype}
        for spec in specs:
            session.add_reader(spec)
        return session

    @staticmethod
    def check(specs: Sequence[ReaderSpec], *, dtype: str | None = None, retrieval: str = DEFAULT_RETRIEVAL,
              k: int = DEFAULT_K) -> None:
        """Refuse settings that cannot work before any model loads: what `open` checks first, and the CLI too."""
        if k < 1:
            raise CepeRagError("k must be at least 1")
        check_choice(dtype, DTYPES, "dtype")
        check_choice(retrieval, RETRIEVAL_MODES, "retrieval mode")
        for spec in specs:
            check_choice(spec.reader, tuple(READERS), "reader")
            check_model_reference(spec.decoder, "decoder")
            check_model_reference(spec.cepe_model, "CEPE checkpoint")
            if spec.reader == "cepe":
                spec.checkpoint()  # one ships for the decoder, or one is given

    def add_reader(self, spec: ReaderSpec) -> Reader:
        """Load the reader `spec` describes into this session (a session made by `open`), under its label."""
        reader = build_reader(spec, **self.build_options)
        if self.retriever is not None:
            self.notes.append(use_stored_states(reader, self.retriever.store))
            self.notes = [note for note in self.notes if note]
        self.readers[spec.label] = reader
        return reader

    def reader(self, name: str | None = None) -> Reader:
        if not self.readers:
            raise CepeRagError("this session has no reader")
        if name is None:
            return next(iter(self.readers.values()))
        if name not in self.readers:
            raise CepeRagError(f"no reader {name!r} in this session; it has: {', '.join(self.readers)}")
        return self.readers[name]

    # --- retrieval ------------------------------------------------------------------------------------

    def search(self, query: str, k: int | None = None) -> list[Passage]:
        """The retriever's top k for `query` as they are: no follow-up rule, no abstention (/v1/retrieve, LangChain's
        retriever)."""
        if self.retriever is None:
            raise CepeRagError("this session has no index")
        with self._retrieval_lock:
            return self.retriever.retrieve(query, self.k if k is None else k)

    def passages_for(self, question: str, *, k: int | None = None, reader: str | None = None,
                     conversation: Conversation | None = None) -> Retrieved:
        """The passages to read for `question` (none for a reader that reads none; sentence focus applied where the
        reader asks for it), and whether to abstain. A follow-up question ("when was it built?") is searched for
        alone and joined to the user's previous question; the search whose best passage is more similar to its query
        wins (docs/chat.md, "Follow-up questions")."""
        k = self.k if k is None else k
        if k < 1:
            raise CepeRagError("k must be at least 1")
        if self.retriever is None or not self.reader(reader).reads_passages:
            return Retrieved([], query=question)
        started = time.perf_counter()
        with self._retrieval_lock:
            passages, query = follow_up_search(self.retriever, question, previous_question(conversation), k)
            abstained = None
            if self.abstention is not None and relevance(passages) is not None:
                abstained = self.abstention.reason(passages, self.retriever.unknown_words(query))
        if abstained is None:
            passages = self.focused(question, passages, self.reader(reader))
        return Retrieved(passages, abstained, query, time.perf_counter() - started)

    def focused(self, question: str, passages: Sequence[Passage], reader: Reader) -> list[Passage]:
        """The passages with sentence focus (retrieval/focus.py) on those `reader` will read (the relevance cutoff's),
        when it asks for it and the session has an embedder to score sentences with."""
        embedder = self.retriever.embedder if self.retriever is not None else None
        if not (reader.focus and reader.reads_passages and embedder is not None and passages):
            return list(passages)
        kept, _ = read_selection(passages, reader.read_margin)
        with self._retrieval_lock:
            focused = {id(p): f for p, f in zip(kept, focus_passages(question, kept, embedder))}
        return [focused.get(id(p), p) for p in passages]

    # --- answering ------------------------------------------------------------------------------------

    def answer(self, question: str, *, on_token: Callable[[str], None] | None = None, **options) -> Answer:
        """`stream`'s Answer; on_token gets the text as it is decoded."""
        for item in self.stream(question, **options):
            if isinstance(item, Answer):
                return item
            if on_token:
                on_token(item)
        raise AssertionError("a stream ends with its Answer")

    def stream(self, question: str, *, reader: str | None = None, k: int | None = None,
               conversation: Conversation | None = None, passages: Sequence[Passage] | None = None,
               **generation) -> Iterator[str | Answer]:
        """Retrieve (unless `passages` are given: the caller's own, always read), then abstain or read: the answer's
        text delta by delta, then the Answer itself (sources, timings, usage, and why it abstained)."""
        question = validate_question(question)
        chosen = self.reader(reader)
        found = Retrieved(self.focused(question, passages, chosen), query=question) if passages is not None else \
            self.passages_for(question, k=k, reader=reader, conversation=conversation)
        if found.abstained:
            chosen.prepare_request(question, found.passages, conversation)  # too long is an error all the same
            yield NOT_IN_DOCUMENTS
            yield Answer(NOT_IN_DOCUMENTS, found.passages, chosen.name, abstained=found.abstained,
                         timings={"retrieval_s": found.seconds, "first_token_s": 0.0, "total_s": 0.0},
                         usage={"prompt_tokens": 0, "decode_steps": 0, "passages_read": 0,
                                "passages_retrieved": len(found.passages)},
                         read_rule=f"no passage read: {found.abstained}")
            return
        for item in chosen.answer_stream(question, found.passages, conversation=conversation, **generation):
            if isinstance(item, Answer):
                item.timings["retrieval_s"] = found.seconds
                item.passages = item.passages or found.passages
                item.usage["passages_retrieved"] = len(found.passages)
            yield item


def follow_up_search(retriever: Retriever, question: str, earlier: str | None, k: int) -> tuple[list[Passage], str]:
    """(passages, the query that found them). A question that names its subject is searched for alone. One that
    does not ("When did it open?", after "Who designed the Tresk Viaduct?") is searched for alone and joined to the
    earlier question, and the ranking whose best passage is more similar to its query wins. (Comparing similarities
    alone is not enough: "Who is the mayor of Brannholm?" joined to the viaduct question is closer to the viaduct's
    passage, which names Brannholm, than the question alone is to the town's.) benchmarks/follow_up_retrieval.py
    measures the rule. Lexical retrieval has no similarity to compare: alone."""
    if not earlier or retriever.mode == "lexical" or names_its_subject(question):
        return retriever.retrieve(question, k), question
    joined = f"{earlier} {question}"
    alone_ranking, joined_ranking = retriever.retrieve_batch([question, joined], k)
    if (relevance(joined_ranking) or float("-inf")) > (relevance(alone_ranking) or float("-inf")):
        return joined_ranking, joined
    return alone_ranking, question


def names_its_subject(question: str) -> bool:
    """Whether the question names something: a capitalised word after its first ("... of Brannholm?")."""
    return any(word[0].isupper() and word != "I" for word in re.findall(r"[\w'-]+", question)[1:])


def previous_question(conversation: Conversation | None) -> str | None:
    """The user's last question before this one, if the conversation has one."""
    for message in reversed(conversation.history if conversation else ()):
        if message.get("role") == "user":
            return str(message.get("content", "")).strip() or None
    return None
