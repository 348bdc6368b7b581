"""Index path: files -> documents -> passages -> embeddings (in batches) -> SQLite + FAISS, or Qdrant."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from cepe_rag.documents import Document, LoadReport, PassageSplitter, iter_documents
from cepe_rag.documents.globs import PathFilter
from cepe_rag.documents.loading import DEFAULT_MAX_DOCUMENT_MB, relative_path
from cepe_rag.indexes import IndexStore, Manifest, PassageStore, StoredPassage, create_or_open_store, writer_lock
from cepe_rag.indexes.faiss_file import check_factory_syntax
from cepe_rag.indexes.layout import MANIFEST_FILE, QdrantLocation
from cepe_rag.indexes.sizing import check_fits
from cepe_rag.models import embed_texts, load_embedder
from cepe_rag.settings import DEFAULT_CHUNK_TOKENS, DEFAULT_EMBEDDER, DEFAULT_FAISS_FACTORY, DEFAULT_OVERLAP_TOKENS
from cepe_rag.types import CepeRagError, Passage, passage_embedding_text

if TYPE_CHECKING:  # the encoder (torch) is loaded only by runs that store context states
    from cepe_rag.cepe.states import StateEncoder


@dataclass
class IndexingSummary:
    index: str
    documents_seen: int = 0
    documents_embedded: int = 0
    documents_unchanged: int = 0
    documents_deleted: int = 0
    documents_excluded: int = 0  # of documents_deleted: still in their folder, but --include/--exclude leave them out
    passages_added: int = 0
    passages_deleted: int = 0
    passages_total: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    embed_seconds: float = 0.0
    states_added: int = 0  # CEPE context states written (with new passages, or for passages that had none)
    states_seconds: float = 0.0
    disk_bytes: int = 0
    interrupted: bool = False


class ProgressHooks:
    """What the indexer reports while it runs; the CLI fills these with rich progress bars."""

    def documents(self, n: int) -> None: ...
    def passages(self, n: int) -> None: ...
    def rebuilding(self, done: int, total: int) -> None: ...


@dataclass
class EmbeddedBatch:
    """Whole documents with their passages, embeddings and (with --context-states) states: one transaction."""

    documents: list[Document]
    passages: list[StoredPassage]
    embeddings: np.ndarray
    states: list[np.ndarray] | None = None
    embed_seconds: float = 0.0
    states_seconds: float = 0.0


class IndexingEngine(Protocol):
    """Where the passages of new and changed documents are split and embedded (the local process by default;
    `ray_indexing.RayEngine` spreads it over Ray workers). The caller stays the one writer of the index."""

    def embed(self, documents: Iterable[Document], manifest: Manifest,
              batch_passages: int) -> Iterator[EmbeddedBatch]: ...


def split_document(document: Document, splitter: PassageSplitter) -> list[StoredPassage]:
    return [StoredPassage(document.key, position, document.title, text, document.source)
            for position, text in enumerate(splitter.split(document.text))]


def encode_passages(embedder, state_encoder: StateEncoder | None, documents: list[Document],
                    passages: Sequence[StoredPassage]) -> EmbeddedBatch:
    """Embed passages (and encode their context states): the one place both engines compute them."""
    t0 = time.perf_counter()
    embeddings = embed_texts(embedder, [passage_embedding_text(p.title, p.text) for p in passages])
    batch = EmbeddedBatch(documents, list(passages), embeddings, embed_seconds=time.perf_counter() - t0)
    if state_encoder is not None:
        t0 = time.perf_counter()
        batch.states = state_encoder.encode([Passage(id=0, text=p.text, title=p.title) for p in passages])
        batch.states_seconds = time.perf_counter() - t0
    return batch


def embed_locally(documents: Iterable[Document], splitter: PassageSplitter, embedder,
                  state_encoder: StateEncoder | None, batch_passages: int) -> Iterator[EmbeddedBatch]:
    """The single-process engine: documents are taken until a batch holds `batch_passages` passages."""
    batch_documents: list[Document] = []
    batch: list[StoredPassage] = []
    for document in documents:
        batch_documents.append(document)
        batch.extend(split_document(document, splitter))
        if len(batch) >= batch_passages:
            yield encode_passages(embedder, state_encoder, batch_documents, batch)
            batch_documents, batch = [], []
    if batch_documents:
        yield encode_passages(embedder, state_encoder, batch_documents, batch)


def build_index(
    sources: list[str | Path],
    index_dir: str | Path,
    *,
    embedder_name: str = DEFAULT_EMBEDDER,
    embedder=None,
    faiss_factory: str = DEFAULT_FAISS_FACTORY,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS,
    batch_passages: int = 1024,
    max_document_mb: float = DEFAULT_MAX_DOCUMENT_MB,
    include: list[str] | tuple[str, ...] = (),
    exclude: list[str] | tuple[str, ...] = (),
    state_encoder: StateEncoder | None = None,
    qdrant: QdrantLocation | None = None,
    hooks: ProgressHooks | None = None,
    engine: IndexingEngine | None = None,
    check_size: bool = True,
) -> IndexingSummary:
    """Add new and changed documents of `sources` to the index and drop the deleted ones.

    Only documents under the given sources are considered for deletion, so several corpora can share
    one index. Memory is bounded by `batch_passages`, not by the corpus.

    `include`/`exclude` (globs on paths relative to each source folder) choose the files of the folders: the
    index then holds what the folders contribute under these filters, so a document indexed earlier that they
    now leave out is removed like a deleted file (counted in `documents_excluded`). A run whose filters leave no
    document at all stops with an error before removing anything, so a mistyped pattern cannot empty the index.

    With a `state_encoder`, every passage's CEPE context states are stored too: new passages' in their own
    transaction, and those of passages indexed without them (or by another encoder) in batches after the walk.

    An `engine` (`ray_indexing.RayEngine`) splits and embeds the new and changed documents elsewhere; this
    process still reads and hashes every document, decides what changed, and commits every batch itself. Its
    `state_encoder` (which must then also make the engine's states) stamps the index and fills passages without
    states.

    With `qdrant` (or into a folder that already is a Qdrant index) the passages are written to a Qdrant
    collection (indexes/qdrant.py) instead of the folder's SQLite + FAISS.

    With `check_size`, a run whose estimated RAM or disk (`indexes.sizing`, from the files' sizes) exceeds what
    this machine has stops with a one-line error before anything is embedded.
    """
    started = time.perf_counter()
    hooks = hooks or ProgressHooks()
    roots = source_roots(sources)
    check_factory_syntax(faiss_factory)
    path_filter = PathFilter(include, exclude)  # a bad pattern stops here, before the embedder loads
    with writer_lock(index_dir):  # one writer per folder: a second run stops instead of redoing the work
        embedder = embedder or load_embedder(embedder_name)
        manifest = Manifest(embedder=embedder_name, dimension=embedder.get_embedding_dimension(),
                            faiss_factory=faiss_factory, chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens)
        if check_size:
            check_run_fits(roots, index_dir, manifest, context_states=state_encoder is not None)
        store = create_or_open_store(index_dir, manifest, qdrant)
        if state_encoder is not None and store.backend != "faiss":
            store.close()
            raise CepeRagError("--context-states needs a FAISS index folder: Qdrant stores no CEPE context states")
        summary = IndexingSummary(index=str(index_dir))
        report = LoadReport()
        known = store.document_digests()
        seen: set[str] = set()
        if state_encoder is not None:
            store.set_context_states_stamp(state_encoder.stamp, state_encoder.state_format)

        def changed_documents() -> Iterator[Document]:
            """The walk: every document read and hashed here, and only the new or changed ones go on."""
            for document in iter_documents(roots, report, max_document_mb=max_document_mb, include=include,
                                           exclude=exclude):
                hooks.documents(1)
                if document.key in seen:
                    continue
                seen.add(document.key)
                if known.get(document.key) == document.digest:
                    summary.documents_unchanged += 1
                    continue
                yield document

        def encode_states(passages: list[Passage]) -> list | None:
            t0 = time.perf_counter()
            states = state_encoder.encode(passages)
            summary.states_seconds += time.perf_counter() - t0
            summary.states_added += len(states)
            return states

        try:
            if engine is None:
                splitter = PassageSplitter(embedder.tokenizer, store.manifest.chunk_tokens,
                                           store.manifest.overlap_tokens)
                batches = embed_locally(changed_documents(), splitter, embedder, state_encoder, batch_passages)
            else:
                batches = engine.embed(changed_documents(), store.manifest, batch_passages)
            for batch in batches:  # each batch of whole documents is one transaction
                store.replace_documents([(d.key, d.digest, d.source) for d in batch.documents], batch.passages,
                                        batch.embeddings, batch.states)
                summary.embed_seconds += batch.embed_seconds
                summary.states_seconds += batch.states_seconds
                summary.states_added += len(batch.states or [])
                summary.documents_embedded += len(batch.documents)
                summary.passages_added += len(batch.passages)
                hooks.passages(len(batch.passages))
            if path_filter and not seen:
                raise CepeRagError(f"no readable document in {', '.join(map(str, sources))} passes --include/--exclude"
                                   + (f" ({len(report.skipped)} skipped)" if report.skipped else "")
                                   + ": nothing was removed from the index; check the patterns")
            # Only after a complete walk do we know which documents are gone.
            gone_documents = [(key, source) for key, source in _documents_under(store, roots) if key not in seen]
            gone = [key for key, _ in gone_documents]
            summary.documents_deleted = len(gone)
            summary.documents_excluded = sum(_filtered_out(source, roots, path_filter) for _, source in gone_documents)
            summary.passages_deleted = store.delete_documents(gone) if gone else 0
            while state_encoder is not None and (missing := store.passages_without_states(batch_passages)):
                store.add_context_states([p.id for p in missing], encode_states(missing))
                hooks.passages(len(missing))
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            summary.documents_seen = len(seen)
            summary.skipped = report.skipped
            _finish_run(store, summary, hooks, started)
        if not summary.interrupted and summary.documents_seen == 0 and summary.passages_total == 0:
            raise CepeRagError(f"no readable documents in {', '.join(map(str, sources))}"
                               + (f" ({len(report.skipped)} skipped)" if report.skipped else ""))
        return summary


def source_roots(sources: Sequence[str | Path]) -> list[str]:
    """The sources as absolute paths; a one-line error when there are none or one does not exist."""
    if not sources:
        raise CepeRagError("no sources given")
    roots = [os.path.abspath(s) for s in sources]
    for root in roots:
        if not os.path.exists(root):
            raise CepeRagError(f"source not found: {root}")
    return roots


def check_run_fits(sources: list[str | Path], index_dir: str | Path, manifest: Manifest, *,
                   context_states: bool) -> None:
    """Stop with one line when indexing `sources` into `index_dir` would need more RAM or disk than this machine has
    (`indexes.sizing`); an existing index's own settings and bytes count."""
    folder = Path(index_dir)
    existing = Manifest.read(folder) if (folder / MANIFEST_FILE).exists() else manifest
    check_fits(source_roots(sources), folder, factory=existing.faiss_factory,
               dimension=manifest.dimension, chunk_tokens=existing.chunk_tokens,
               overlap_tokens=existing.overlap_tokens, context_states=context_states,
               existing_bytes=sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) if folder.is_dir() else 0)


def _filtered_out(source: str, roots: list[str], path_filter: PathFilter) -> bool:
    """A stored document whose file is still there but which the filters now leave out of its folder."""
    if not path_filter or not os.path.isfile(source):
        return False
    return any(os.path.isdir(root) and source.startswith(root.rstrip(os.sep) + os.sep)
               and not path_filter.accepts(relative_path(source, root)) for root in roots)


def _documents_under(store: PassageStore, roots: list[str]) -> list[tuple[str, str]]:
    return [(key, source) for key, source in store.document_sources()
            if any(source == root or source.startswith(root.rstrip(os.sep) + os.sep) for root in roots)]


def copy_index(
    source_index: str | Path,
    index_dir: str | Path,
    *,
    faiss_factory: str = DEFAULT_FAISS_FACTORY,
    qdrant: QdrantLocation | None = None,
    batch_passages: int = 1024,
    hooks: ProgressHooks | None = None,
) -> IndexingSummary:
    """Make `index_dir` hold the documents of the FAISS index folder `source_index`, with their stored embeddings
    (nothing is embedded): into Qdrant (`qdrant`, or a folder that is a Qdrant index), or another FAISS factory.

    Incremental by document digest like `build_index`; the documents `index_dir` holds that `source_index` lacks
    are removed, so the copy mirrors the source. Safe to interrupt and re-run."""
    started = time.perf_counter()
    hooks = hooks or ProgressHooks()
    if Path(source_index).resolve() == Path(index_dir).resolve():
        raise CepeRagError("--from-index names the --index folder itself: copy into another folder")
    check_factory_syntax(faiss_factory)
    source = IndexStore.open_catalog(source_index)
    with writer_lock(index_dir):
        manifest = Manifest(embedder=source.manifest.embedder, dimension=source.manifest.dimension,
                            faiss_factory=faiss_factory, chunk_tokens=source.manifest.chunk_tokens,
                            overlap_tokens=source.manifest.overlap_tokens)
        store = create_or_open_store(index_dir, manifest, qdrant)
        summary = IndexingSummary(index=str(index_dir))
        known = store.document_digests()
        seen: set[str] = set()
        documents: list[tuple[str, str, str]] = []
        passages: list[StoredPassage] = []
        vectors: list[np.ndarray] = []

        def flush() -> None:
            if documents:
                store.replace_documents(documents, passages, np.concatenate(vectors))
                summary.documents_embedded += len(documents)  # copied: their embeddings as stored
                summary.passages_added += len(passages)
                hooks.passages(len(passages))
                documents.clear(), passages.clear(), vectors.clear()

        try:
            for document, document_passages, embeddings in source.export_documents():
                hooks.documents(1)
                seen.add(document[0])
                if known.get(document[0]) == document[1]:
                    summary.documents_unchanged += 1
                    continue
                documents.append(document)
                passages.extend(document_passages)
                vectors.append(embeddings)
                if len(passages) >= batch_passages:
                    flush()
            flush()
            gone = [key for key in known if key not in seen]
            summary.documents_deleted = len(gone)
            summary.passages_deleted = store.delete_documents(gone) if gone else 0
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            source.close()
            summary.documents_seen = len(seen)
            _finish_run(store, summary, hooks, started)
        return summary


def _finish_run(store, summary: IndexingSummary, hooks: ProgressHooks, started: float) -> None:
    """Close a run, finished or interrupted: committed batches are searchable even after an interruption (the next
    run resumes after them)."""
    store.finish_writes(progress=hooks.rebuilding)
    summary.passages_total = store.count()
    summary.disk_bytes = store.disk_bytes()
    store.close()
    summary.seconds = time.perf_counter() - started
