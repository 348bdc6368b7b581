"""`cepe-rag eval`: open-domain QA, every reader at every k, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress

from cepe_rag.cli.opening import open_retriever, open_session
from cepe_rag.cli.options import (
    DtypeOption,
    IndexOption,
    RetrievalOption,
    SourceFilterOption,
    TitleFilterOption,
    check_options,
    quiet_libraries,
    reader_options,
    store_options,
)
from cepe_rag.cli.output import console
from cepe_rag.eval import answerable_subset, load_questions, run_eval, summarise_folder
from cepe_rag.indexes.layout import QdrantLocation, check_index_folder
from cepe_rag.models import (
    default_device,
    resolve_dtype,
)
from cepe_rag.settings import (
    DEFAULT_INDEX,
    DEFAULT_RETRIEVAL,
    ReaderSpec,
)
from cepe_rag.types import CepeRagError

app = typer.Typer(add_completion=False)


@app.command("eval")
@reader_options
@store_options
def evaluate(
    questions: Annotated[str, typer.Option(help="JSONL file (FlashRAG or NQ-open format) or hub dataset name.")],
    index_dir: IndexOption = DEFAULT_INDEX,
    readers: Annotated[str, typer.Option(help="Comma-separated: parallel, concat, closed-book, cepe.")] = (
        "parallel,concat,closed-book"),
    k: Annotated[str, typer.Option("--k", help="Comma-separated passage counts.")] = "5,20,50",
    limit: Annotated[int, typer.Option(help="First N questions (after --answer-in-corpus filtering); 0 = all.")] = 0,
    answer_in_corpus: Annotated[bool, typer.Option(help="Keep questions whose answer occurs in the corpus.")] = False,
    out: Annotated[Path, typer.Option(help="Run folder: retrieval cache, predictions, summary, plot.")] = Path(
        "runs/eval"),
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit (the paper: 25).")] = 25,
    split: Annotated[str, typer.Option(help="Split, for hub datasets.")] = "validation",
    dtype: DtypeOption = None,
    summary_only: Annotated[bool, typer.Option(help="Only summarise the predictions already in --out.")] = False,
    retrieval: RetrievalOption = DEFAULT_RETRIEVAL,
    source: SourceFilterOption = None,
    title: TitleFilterOption = None,
    spec_options: dict | None = None,
    qdrant: QdrantLocation | None = None,
) -> None:
    """Open-domain QA: retrieval once, then every reader at every k; resumable, cached per run folder."""
    try:
        ks = sorted({int(x) for x in k.split(",") if x.strip()})
    except ValueError:
        raise CepeRagError(f"--k {k!r}: expected comma-separated whole numbers, e.g. 5,20,50") from None
    specs = [ReaderSpec(reader=name.strip(), **spec_options) for name in readers.split(",") if name.strip()]
    check_options(ks, specs, dtype, retrieval)
    check_index_folder(index_dir)

    quiet_libraries()
    examples = load_questions(questions, split=split)
    if summary_only:
        if answer_in_corpus:
            examples = answerable_subset(examples, open_retriever(index_dir, retrieval, source, title, qdrant))
        summarise_folder(examples[:limit] if limit else examples, out)
        Console().print((out / "summary.md").read_text())
        return
    # The harness reads each question's cached top-k at every k, never abstaining: it measures readers.
    session = open_session(index_dir, specs, retrieval=retrieval, source=source, title=title, qdrant=qdrant,
                           dtype=dtype, abstain=False, k=max(ks), max_new_tokens=max_new_tokens,
                           stop_strings=("\n",))
    retriever, built = session.retriever, session.readers
    if answer_in_corpus:
        examples = answerable_subset(examples, retriever)
    examples = examples[:limit] if limit else examples
    torch_dtype = resolve_dtype(dtype, default_device())
    common = {"dtype": str(torch_dtype).removeprefix("torch."), "max_new_tokens": max_new_tokens}
    settings = {spec.label: {**spec.settings(), **common} for spec in specs}
    console.print(f"{len(examples)} questions · readers {', '.join(built)} · k {ks} · run folder {out}")
    with Progress(console=console) as progress:
        task = progress.add_task("answering", total=None)

        def report(label, done, total):
            progress.update(task, description=label, completed=done, total=total)

        run_eval(examples, session, ks, out, progress=report, settings=settings)
    Console().print((out / "summary.md").read_text())
    console.print(f"predictions, summary.json and accuracy_vs_k.png in {out}")
