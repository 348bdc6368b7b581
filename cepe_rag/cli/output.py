"""What the question-answering commands print: notes and errors on stderr (one line each), answers on stdout, the
sources table and the timing line after each answer."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from cepe_rag.settings import ReaderSpec

console = Console(stderr=True, soft_wrap=True)  # one message, one line


def say_once(note: str | None) -> None:
    if note:
        console.print(f"[dim]{note}[/]", highlight=False)


def describe(session, spec: ReaderSpec) -> str:
    """The line before an answer: which reader, decoder and k."""
    reader = session.reader()
    decoder = spec.checkpoint() if spec.reader == "cepe" else spec.decoder
    return f"reader: {spec.reader} · decoder: {decoder}" + (f" · k={session.k}" if reader.reads_passages else "")


def show_sources(answer, *, since_question: bool = False) -> None:
    """After an answer: why it abstained, the passages it read (a table) and one line of timings and the read rule."""
    if answer.abstained:
        console.print(f"[dim]not read: {answer.abstained} (--no-abstain reads anyway)[/]", highlight=False)
    if answer.passages:
        table = Table(title="Sources", title_justify="left")
        # Ranked by the retriever's score (fused, for hybrid); shown: the cosine and BM25 a reader can judge.
        for column in ("#", "similarity", "bm25", "title", "source"):
            table.add_column(column, overflow="fold")  # in a narrow terminal a long path wraps, keeping its file name
        for rank, p in enumerate(answer.passages, start=1):
            table.add_row(str(rank), "–" if p.dense_score is None else f"{p.dense_score:.3f}",
                          "–" if p.lexical_score is None else f"{p.lexical_score:.1f}", p.title, p.source)
        # Piped output has no terminal width to fit: keep rows whole (rich would assume 80 columns).
        Console(width=None if sys.stdout.isatty() else 240).print(table)
    t = answer.timings
    # since_question: from the question to its first token, retrieval included (chat); else from the reader's start
    first = t.get("since_question_s", 0.0) if since_question else t["first_token_s"]
    console.print(f"[dim]retrieval {t.get('retrieval_s', 0) * 1000:.0f} ms · first token {first:.2f} s · "
                  f"generation {t['total_s']:.2f} s · {answer.usage['prompt_tokens']} prompt tokens · "
                  f"{answer.read_rule or 'no passage read'}[/]", highlight=False)
