"""`cepe-rag chat`: load once, then answer turn after turn (prompt_toolkit for line editing and history).

At a terminal, the turns make one conversation: the chat template carries the earlier ones, and a follow-up question
is searched for alone and joined to the previous question (RagSession.passages_for). Piped input answers one
question per line, each on its own. Slash commands change k, the reader and retrieval between questions."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import typer

from cepe_rag.cli.opening import open_session
from cepe_rag.cli.options import (
    AbstainOption,
    DeviceOption,
    DtypeOption,
    IndexOption,
    KOption,
    MaxNewTokensOption,
    ReaderOption,
    RetrievalOption,
    SourceFilterOption,
    TemperatureOption,
    TitleFilterOption,
    asked_reader,
    check_options,
    reader_options,
    store_options,
)
from cepe_rag.cli.output import console, describe, show_sources
from cepe_rag.indexes.layout import QdrantLocation, check_index_folder
from cepe_rag.pipelines.session import RagSession
from cepe_rag.readers import READERS
from cepe_rag.retrieval import PassageFilter, Retriever
from cepe_rag.settings import (
    DEFAULT_ANSWER_TOKENS,
    DEFAULT_INDEX,
    DEFAULT_K,
    DEFAULT_RETRIEVAL,
    RETRIEVAL_MODES,
    ReaderSpec,
    check_choice,
)
from cepe_rag.types import Answer, CepeRagError, Conversation

# Earlier exchanges the prompt carries: a 2,048-token window also holds the passages (the oldest go first when a
# prompt would not fit).
MAX_EXCHANGES = 4

HELP = """/k N              passages to retrieve (the relevance cutoff reads those close to the best)
/reader NAME      concat, parallel, cepe or closed-book (loaded on first use)
/retrieval MODE   hybrid, dense or lexical
/source GLOB      only passages whose source path matches (no GLOB: any); /title GLOB likewise
/sources          the last answer's passages, with their text
/new              forget the conversation
/help             this list
/quit             leave (also Ctrl-D); Ctrl-C stops an answer, not the chat"""


class Chat:
    """The state between turns: the session, the reader and k in use, the conversation and the last answer."""

    def __init__(self, session: RagSession, spec: ReaderSpec, *, generation: dict | None = None,
                 write: Callable[[str], None] | None = None):
        self.session = session
        self.spec = spec
        self.reader = spec.label
        self.generation = generation or {}
        self.conversation = Conversation()
        self.last: Answer | None = None
        self.write = write or _write_stdout

    # --- questions ------------------------------------------------------------------------------------

    def ask(self, question: str, *, keep: bool = True) -> Answer | None:
        """Answer one question, streaming; None when stopped with Ctrl-C. `keep`: the exchange joins the
        conversation."""
        asked = time.perf_counter()
        first_token: list[float] = []

        def show(delta: str) -> None:
            if not first_token:
                first_token.append(time.perf_counter() - asked)
            self.write(delta)

        while True:
            try:
                answer = self.session.answer(question, reader=self.reader, conversation=self.conversation,
                                             on_token=show, **self.generation)
                break
            except KeyboardInterrupt:
                self.say_stopped()
                return None
            except CepeRagError as error:
                # A long conversation can outgrow the window: its oldest exchange goes, then the question again.
                if self.conversation.history and "prompt tokens" in str(error) and not first_token:
                    self.conversation = replace(self.conversation, history=self.conversation.history[2:])
                    continue
                raise
        self.write("\n")
        answer.timings["since_question_s"] = first_token[0] if first_token else 0.0
        show_sources(answer, since_question=True)
        self.last = answer
        if keep:
            history = self.conversation.then(question, answer.text).history
            self.conversation = replace(self.conversation, history=history[-2 * MAX_EXCHANGES:])
        return answer

    # --- slash commands -------------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run a slash command; False: the chat ends."""
        name, _, argument = line[1:].strip().partition(" ")
        argument = argument.strip()
        if name in ("quit", "exit", "q"):
            return False
        handlers = {"help": self.show_help, "k": self.set_k, "reader": self.set_reader,
                    "retrieval": self.set_retrieval, "source": lambda glob: self.set_filter("source", glob),
                    "title": lambda glob: self.set_filter("title", glob), "sources": self.show_passages,
                    "new": self.forget}
        if name not in handlers:
            raise CepeRagError(f"unknown command /{name}: /help lists them")
        handlers[name](argument)
        return True

    def show_help(self, _: str = "") -> None:
        console.print(HELP, highlight=False)

    def set_k(self, value: str) -> None:
        if not value.isdigit() or int(value) < 1:
            raise CepeRagError(f"/k needs a whole number of at least 1, not {value!r}")
        self.session.k = int(value)
        console.print(f"[dim]k={self.session.k}[/]")

    def set_reader(self, name: str) -> None:
        check_choice(name, tuple(READERS), "reader")
        spec = replace(self.spec, reader=name)
        if name == "cepe":
            spec.checkpoint()  # one ships for the decoder, or one was given
        if spec.label not in self.session.readers:
            console.print(f"[dim]loading {spec.label}…[/]")
            self.session.add_reader(spec)
        self.reader = spec.label
        console.print(f"[dim]reader: {spec.label}[/]")

    def set_retrieval(self, mode: str) -> None:
        check_choice(mode, RETRIEVAL_MODES, "retrieval mode")
        self.reopen(mode=mode)
        console.print(f"[dim]retrieval: {self.session.retriever.mode}[/]")

    def set_filter(self, field: str, glob: str) -> None:
        old = self.retriever().filters
        self.reopen(filters=replace(old, **{field: glob or None}))
        if self.session.retriever.allowed is not None and not self.session.retriever.allowed:
            self.reopen(filters=old)
            raise CepeRagError(f"no passage's {field} matches {glob!r} (the filter is unchanged)")
        filters = self.session.retriever.filters
        console.print(f"[dim]filters: source {filters.source or 'any'} · title {filters.title or 'any'}[/]")

    def reopen(self, *, mode: str | None = None, filters: PassageFilter | None = None) -> None:
        current = self.retriever()
        self.session.retriever = Retriever(current.store, current.embedder, mode=mode or current.mode,
                                           filters=current.filters if filters is None else filters)

    def retriever(self) -> Retriever:
        if self.session.retriever is None:
            raise CepeRagError("this chat has no index")
        return self.session.retriever

    def show_passages(self, _: str = "") -> None:
        if self.last is None or not self.last.passages:
            console.print("[dim]no passages yet[/]")
            return
        for rank, passage in enumerate(self.last.passages, start=1):
            scores = f"similarity {passage.dense_score:.3f}" if passage.dense_score is not None else ""
            console.print(f"[bold]{rank}. {passage.title or '(untitled)'}[/] [dim]{passage.source} {scores}[/]",
                          highlight=False)
            console.print(passage.text, highlight=False, markup=False)

    def forget(self, _: str = "") -> None:
        self.conversation = Conversation()
        console.print("[dim]a new conversation[/]")

    # --- the loops ------------------------------------------------------------------------------------

    def turn(self, line: str, *, keep: bool = True) -> bool:
        """One line typed or piped: a command or a question; False: the chat ends. Errors are one line each."""
        line = line.strip()
        if not line:
            return True
        try:
            if line.startswith("/"):
                return self.command(line)
            self.ask(line, keep=keep)
        except CepeRagError as error:
            console.print(f"[red]error:[/] {error}", highlight=False)
        return True

    def say_stopped(self) -> None:
        self.write("\n")
        console.print("[dim]stopped[/]")

    def run_piped(self, lines: Iterable[str]) -> None:
        for line in lines:
            if not self.turn(line, keep=False):
                return

    def run_terminal(self) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        path = history_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(path))
        except OSError:
            history = InMemoryHistory()
        prompt = PromptSession(history=history)
        # Ctrl-C stops an answer even when the chat was started with SIGINT ignored (a background job of a script,
        # nohup): Python then installs no handler of its own, and the chat's KeyboardInterrupt would never come.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        console.print("[dim]ask a question; /help lists the commands; Ctrl-D leaves[/]")
        while True:
            try:
                line = prompt.prompt("› ")
            except KeyboardInterrupt:  # at the prompt: a fresh line, as in a shell
                continue
            except EOFError:
                return
            try:
                if not self.turn(line):
                    return
            except KeyboardInterrupt:  # before the answer began (retrieval, a command): the turn stops, not the chat
                self.say_stopped()


def history_file() -> Path:
    """Where typed questions are kept between chats ($XDG_STATE_HOME, else ~/.local/state)."""
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "cepe-rag" / "chat_history"


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


app = typer.Typer(add_completion=False)


@app.command()
@reader_options
@store_options
def chat(
    index_dir: IndexOption = DEFAULT_INDEX,
    k: KOption = DEFAULT_K,
    reader: ReaderOption = None,
    max_new_tokens: MaxNewTokensOption = DEFAULT_ANSWER_TOKENS,
    temperature: TemperatureOption = 0.0,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    retrieval: RetrievalOption = DEFAULT_RETRIEVAL,
    source: SourceFilterOption = None,
    title: TitleFilterOption = None,
    abstain: AbstainOption = True,
    spec_options: dict | None = None,
    qdrant: QdrantLocation | None = None,
) -> None:
    """Talk to your documents: load once, then answer question after question with sources (/help in the chat).
    Piped input answers one question per line."""
    spec = asked_reader(reader, spec_options)
    check_options([k], [spec], dtype, retrieval)
    check_index_folder(index_dir)
    session = open_session(index_dir, [spec], retrieval=retrieval, source=source, title=title, qdrant=qdrant,
                           device=device, dtype=dtype, abstain=abstain, k=k, max_new_tokens=max_new_tokens)
    console.print(f"[dim]{describe(session, spec)}[/]")
    conversation = Chat(session, spec, generation={"temperature": temperature})
    if sys.stdin.isatty():
        conversation.run_terminal()
    else:
        conversation.run_piped(sys.stdin)
