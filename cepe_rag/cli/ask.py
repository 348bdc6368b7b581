"""`cepe-rag ask`: one question, its answer streamed, then its sources."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from typing import Annotated

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
from cepe_rag.settings import (
    DEFAULT_ANSWER_TOKENS,
    DEFAULT_INDEX,
    DEFAULT_K,
    DEFAULT_RETRIEVAL,
)
from cepe_rag.types import validate_question

app = typer.Typer(add_completion=False)


@app.command()
@reader_options
@store_options
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    index_dir: IndexOption = DEFAULT_INDEX,
    k: KOption = DEFAULT_K,
    reader: ReaderOption = None,
    max_new_tokens: MaxNewTokensOption = DEFAULT_ANSWER_TOKENS,
    temperature: TemperatureOption = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON result instead of streaming.")] = False,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    retrieval: RetrievalOption = DEFAULT_RETRIEVAL,
    source: SourceFilterOption = None,
    title: TitleFilterOption = None,
    abstain: AbstainOption = True,
    spec_options: dict | None = None,
    qdrant: QdrantLocation | None = None,
) -> None:
    """Retrieve passages for QUESTION and answer it, streaming the answer and listing its sources."""
    question = validate_question(question)
    spec = asked_reader(reader, spec_options)
    check_options([k], [spec], dtype, retrieval)
    check_index_folder(index_dir)
    started = time.perf_counter()
    session = open_session(index_dir, [spec], retrieval=retrieval, source=source, title=title, qdrant=qdrant,
                           device=device, dtype=dtype, abstain=abstain, k=k, max_new_tokens=max_new_tokens,
                           temperature=temperature)
    load_s = time.perf_counter() - started

    def show(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    if not as_json:
        console.print(f"[dim]{describe(session, spec)}[/]")
    answer = session.answer(question, on_token=None if as_json else show)
    answer.timings["load_s"] = load_s
    if as_json:
        print(json.dumps({"question": question, **asdict(answer)}, ensure_ascii=False))
        return
    sys.stdout.write("\n")
    show_sources(answer)
