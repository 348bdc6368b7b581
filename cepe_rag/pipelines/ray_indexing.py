"""`cepe-rag index --engine ray`: splitting, embedding and context states on a pool of Ray Data actors.

The driver (the `cepe-rag index` process) reads and hashes every document and decides which are new or
changed, exactly as the single-process path does; only those go to Ray. Each actor holds the embedder (and
the CEPE state encoder) and turns a batch of documents into passages with their embeddings. The results come
back in document order and the driver, the one SQLite writer, commits them in batches of whole documents,
one transaction each, as `build_index` does. A worker that dies is restarted by Ray and its batch retried;
when the run fails anyway, the committed batches are kept and the next run embeds only what is missing.

`import ray` happens only here, and only when the Ray engine runs: Ray is the optional `ray` extra.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np

from cepe_rag.documents import Document, PassageSplitter
from cepe_rag.indexes import Manifest, StoredPassage
from cepe_rag.models import load_embedder
from cepe_rag.pipelines.indexing import EmbeddedBatch, encode_passages
from cepe_rag.settings import DEFAULT_RAY_BATCH_DOCUMENTS, DEFAULT_RAY_WORKERS
from cepe_rag.types import CepeRagError

# The driver hands Ray the changed documents in windows of about this much text, so its memory stays bounded.
DEFAULT_WINDOW_CHARS = 64 * 2**20


def connect(address: str | None = None):
    """The `ray` module, connected: to the cluster at `address` ("auto": the one this machine belongs to), else
    to the instance this process already started, else to a new local one."""
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise CepeRagError("--engine ray needs Ray: pip install 'cepe-rag[ray]' (or 'ray[data]')") from error
    if not ray.is_initialized():
        check_reachable(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = f" at {address}" if address else ""
            raise CepeRagError(f"cannot start or reach Ray{where}: {_first_line(error)}") from error
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # results come back in document order
    context.enable_progress_bars = False  # the CLI draws its own
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


class IndexWorker:
    """One Ray actor: the embedder (and state encoder) loaded once; a batch of documents -> one row per passage."""

    def __init__(self, embedder_factory: Callable, state_encoder_factory: Callable | None, chunk_tokens: int,
                 overlap_tokens: int):
        self.embedder = embedder_factory()
        self.state_encoder = state_encoder_factory() if state_encoder_factory else None
        self.splitter = PassageSplitter(self.embedder.tokenizer, chunk_tokens, overlap_tokens)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows, passages = [], []
        for row, title, text in zip(batch["row"], batch["title"], batch["text"]):
            pieces = self.splitter.split(str(text))
            rows += [int(row)] * len(pieces)
            passages += [StoredPassage("", position, str(title), piece, "") for position, piece in enumerate(pieces)]
        out = {"row": np.array(rows, dtype=np.int64), "text": np.array([p.text for p in passages], dtype=object)}
        if not passages:
            out["embedding"] = np.zeros((0, self.embedder.get_embedding_dimension()), dtype=np.float32)
            return out
        encoded = encode_passages(self.embedder, self.state_encoder, [], passages)
        out["embedding"] = encoded.embeddings
        # Each passage carries its share of the batch's seconds, so the driver can add them up.
        out["embed_seconds"] = np.full(len(passages), encoded.embed_seconds / len(passages))
        if encoded.states is not None:
            out["states"] = np.empty(len(passages), dtype=object)
            for i, states in enumerate(encoded.states):  # one by one: equal shapes must not be read as one array
                out["states"][i] = states
            out["states_seconds"] = np.full(len(passages), encoded.states_seconds / len(passages))
        return out


@dataclass
class RayEngine:
    """Embed new and changed documents on `workers` Ray actors (`cpus_per_worker` each), `batch_documents`
    documents per actor call. `address`: a running cluster ("auto"), or None for this process's Ray instance
    (started on first use). `embedder_factory`/`state_encoder_factory` run inside each actor (default: the
    index's embedder by name; no states)."""

    address: str | None = None
    workers: int = DEFAULT_RAY_WORKERS
    batch_documents: int = DEFAULT_RAY_BATCH_DOCUMENTS
    cpus_per_worker: float = 1.0
    embedder_factory: Callable | None = None
    state_encoder_factory: Callable | None = None
    window_chars: int = DEFAULT_WINDOW_CHARS

    def __post_init__(self):
        if self.workers < 1 or self.batch_documents < 1 or self.cpus_per_worker <= 0:
            raise CepeRagError("--ray-workers and --ray-batch-size must be at least 1")

    def embed(self, documents: Iterable[Document], manifest: Manifest,
              batch_passages: int) -> Iterator[EmbeddedBatch]:
        ray = connect(self.address)
        embedded = (item for window in _windows(documents, self.window_chars)
                    for item in self._embed_window(ray, window, manifest))
        try:
            yield from _commit_batches(embedded, batch_passages)
        except ray.exceptions.RayError as error:
            raise CepeRagError(f"the Ray pipeline failed ({_first_line(error)}); the batches committed so far are "
                               "kept: run the same command again to finish") from error

    def _embed_window(self, ray, window: list[Document], manifest: Manifest):
        """(document, passage texts, embeddings, states, seconds) for each document of the window, in order."""
        factory = self.embedder_factory or partial(load_embedder, manifest.embedder)
        dataset = ray.data.from_items([{"row": i, "title": d.title, "text": d.text} for i, d in enumerate(window)])
        dataset = dataset.map_batches(
            IndexWorker, batch_size=self.batch_documents, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.workers), num_cpus=self.cpus_per_worker,
            fn_constructor_kwargs={"embedder_factory": factory, "state_encoder_factory": self.state_encoder_factory,
                                   "chunk_tokens": manifest.chunk_tokens, "overlap_tokens": manifest.overlap_tokens})
        done = 0  # documents of the window handed on so far
        current: list[int] = []  # the result rows of document `done`
        for out in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for j, row in enumerate(out["row"]):
                while done < row:  # document `done` is complete (documents with no passage have no row)
                    yield _document_result(window[done], _columns(current))
                    done, current = done + 1, []
                current.append((out, j))
        while done < len(window):
            yield _document_result(window[done], _columns(current))
            done, current = done + 1, []


def _columns(rows: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, list]:
    """Rows picked out of result batches -> columns (lists)."""
    columns: dict[str, list] = {}
    for out, j in rows:
        for name, values in out.items():
            columns.setdefault(name, []).append(values[j])
    return columns


def _document_result(document: Document, columns: dict[str, list]):
    passages = [StoredPassage(document.key, position, document.title, str(text), document.source)
                for position, text in enumerate(columns.get("text", []))]
    return (document, passages, columns.get("embedding", []), columns.get("states"),
            float(sum(columns.get("embed_seconds", []))), float(sum(columns.get("states_seconds", []))))


def _commit_batches(embedded, batch_passages: int) -> Iterator[EmbeddedBatch]:
    """Documents taken until a batch holds `batch_passages` passages: the same batches as the local engine."""
    batch: EmbeddedBatch | None = None
    vectors: list = []
    for document, passages, embeddings, states, embed_seconds, states_seconds in embedded:
        if batch is None:
            batch, vectors = EmbeddedBatch([], [], np.zeros((0, 0), dtype=np.float32)), []
        batch.documents.append(document)
        batch.passages += passages
        vectors += embeddings
        if states is not None:
            batch.states = batch.states if batch.states is not None else []
            batch.states.extend(np.asarray(s) for s in states)
        batch.embed_seconds += embed_seconds
        batch.states_seconds += states_seconds
        if len(batch.passages) >= batch_passages:
            yield _finish(batch, vectors)
            batch = None
    if batch is not None:
        yield _finish(batch, vectors)


def _finish(batch: EmbeddedBatch, vectors: list) -> EmbeddedBatch:
    if vectors:
        batch.embeddings = np.stack(vectors).astype(np.float32, copy=False)
    return batch


def _windows(documents: Iterable[Document], window_chars: int) -> Iterator[list[Document]]:
    window, size = [], 0
    for document in documents:
        window.append(document)
        size += len(document.text)
        if size >= window_chars:
            yield window
            window, size = [], 0
    if window:
        yield window


def check_reachable(address: str | None) -> None:
    """A "host:port" that nothing answers on fails at once (Ray itself would retry for minutes)."""
    host, _, port = (address or "").rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise CepeRagError(f"cannot reach Ray at {address}: {error.strerror or error}") from error


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
