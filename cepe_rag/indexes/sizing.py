"""Will an index fit? A cheap estimate of the RAM and disk an `index` run needs, checked before it starts.

From the corpus's size on disk (file sizes, nothing read but the first MiB of a JSONL file, to count its lines)
to passages, then per passage: the SQLite row (embedding, text, FTS5, page slack), the context states if stored,
and the FAISS index, which is built in memory and, for Flat and HNSW, must fit in memory to be searched.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import faiss

from cepe_rag.documents.loading import SUPPORTED_SUFFIXES
from cepe_rag.indexes.faiss_file import new_faiss_index, training_size
from cepe_rag.types import CepeRagError

BYTES_PER_TOKEN = 4.2  # English text per MiniLM word-piece token (measured on the demo corpus: 484 chars / 115 tokens)
SQLITE_OVERHEAD = 1200  # bytes a passage row costs in SQLite beyond its embedding and text: FTS5 postings, keys and
# source path, indexes, page slack (measured with 16 KiB pages: 2,916 bytes a passage for a 1,536-byte embedding
# and 560 bytes of text)
STATES_BYTES_PER_TOKEN = 90_000 / 256  # CEPE context states: ~90 KB for a 256-token passage (float16)
RUNTIME_RAM = 1_500 * 2**20  # Python, torch, the embedder and a batch of passages in flight
IDMAP_BYTES = 56  # IndexIDMap2 per vector: its id table and reverse map (Flat, HNSW, PQ without IVF)
JSONL_SAMPLE = 2**20
TRAINING_COPIES = 3  # memory while an untrained factory trains, in training samples: the sample, its residuals for
# the PQ codes, k-means buffers (measured: +497 MiB for a 154 MB sample, IVF1024,PQ32 on 200k passages)


@dataclass
class SizeEstimate:
    passages: int
    faiss_bytes: int  # the FAISS index, in memory while built and in its file
    training_bytes: int  # the sample an untrained factory learns from, in memory while it trains
    sqlite_bytes: int
    states_bytes: int
    ram_bytes: int  # peak resident memory of the run
    disk_bytes: int  # the index folder at the end, and a second FAISS file while it is rewritten


def corpus_stats(sources: list[str | Path]) -> tuple[int, int]:
    """(bytes, documents) of the supported files under these sources, from their sizes;
    a JSONL file's lines (one document each) are its size over the mean length of its first MiB's lines."""
    total = documents = 0
    for source in sources:
        paths = [Path(source)] if os.path.isfile(source) else (
            Path(root) / name for root, _, names in os.walk(source) for name in names)
        for path in paths:
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                continue
            try:
                size = path.stat().st_size
            except OSError:
                continue
            total += size
            documents += _jsonl_lines(path, size) if path.suffix.lower() == ".jsonl" else 1
    return total, documents


def _jsonl_lines(path: Path, size: int) -> int:
    try:
        with path.open("rb") as handle:
            head = handle.read(JSONL_SAMPLE)
    except OSError:
        return 1
    lines = head.count(b"\n")
    if len(head) == size or lines == 0:
        return max(lines + (not head.endswith(b"\n") and bool(head.strip())), 1)
    return max(1, round(size * lines / len(head[:head.rfind(b"\n") + 1])))


def faiss_bytes_per_vector(factory: str, dimension: int) -> tuple[float, int]:
    """(bytes per vector, fixed bytes) of a FAISS index of this factory, from an empty one's structure."""
    index = new_faiss_index(dimension, factory)
    outer = faiss.downcast_index(index)
    per_vector = 0.0
    if isinstance(outer, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        per_vector += IDMAP_BYTES
        outer = faiss.downcast_index(outer.index)
    while isinstance(outer, faiss.IndexPreTransform):
        outer = faiss.downcast_index(outer.index)
    try:
        ivf = faiss.extract_index_ivf(outer)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        return per_vector + ivf.code_size + 8, ivf.nlist * dimension * 4  # codes + ids in the lists; centroids
    if isinstance(outer, faiss.IndexHNSW):
        storage = faiss.downcast_index(outer.storage)
        code = storage.code_size if hasattr(storage, "code_size") else dimension * 4
        return per_vector + code + 8 * outer.hnsw.nb_neighbors(0) // 2 + 20, 0  # level-0 links (int32 × 2M), levels
    code = outer.code_size if hasattr(outer, "code_size") else dimension * 4
    return per_vector + code, 0


def estimate(corpus_bytes: int, documents: int, *, factory: str, dimension: int, chunk_tokens: int,
             overlap_tokens: int, context_states: bool, existing_passages: int = 0) -> SizeEstimate:
    new_tokens = max(chunk_tokens - overlap_tokens, 1)
    passages = max(documents, round(corpus_bytes / (BYTES_PER_TOKEN * new_tokens)), existing_passages)
    text_bytes = min(corpus_bytes / max(passages, 1), BYTES_PER_TOKEN * chunk_tokens)
    per_vector, fixed = faiss_bytes_per_vector(factory, dimension)
    index = new_faiss_index(dimension, factory)
    training = TRAINING_COPIES * training_size(index, passages) * dimension * 4 if not index.is_trained else 0
    faiss_total = int(passages * per_vector + fixed)
    sqlite = int(passages * (dimension * 4 + text_bytes + SQLITE_OVERHEAD))
    states = int(passages * min(chunk_tokens, text_bytes / BYTES_PER_TOKEN) * STATES_BYTES_PER_TOKEN) \
        if context_states else 0
    return SizeEstimate(passages=passages, faiss_bytes=faiss_total, training_bytes=training, sqlite_bytes=sqlite,
                        states_bytes=states, ram_bytes=RUNTIME_RAM + faiss_total + training,
                        disk_bytes=sqlite + states + 2 * faiss_total)


def available_memory() -> int:
    """Memory available to a new process without swapping (psutil if installed, else /proc/meminfo)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62  # unknown: do not refuse


def free_disk(folder: str | Path) -> int:
    """Free bytes on the disk that holds `folder` (or its nearest existing parent)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_fits(sources: list[str | Path], index_dir: str | Path, *, factory: str, dimension: int, chunk_tokens: int,
               overlap_tokens: int, context_states: bool, existing_passages: int = 0,
               existing_bytes: int = 0) -> SizeEstimate:
    """The estimate for indexing these sources into `index_dir`; a one-line CepeRagError when it needs more RAM or
    disk than this machine has (what the index folder already holds is counted as already on disk)."""
    corpus_bytes, documents = corpus_stats(sources)
    found = estimate(corpus_bytes, documents, factory=factory, dimension=dimension, chunk_tokens=chunk_tokens,
                     overlap_tokens=overlap_tokens, context_states=context_states, existing_passages=existing_passages)
    memory, disk = available_memory(), free_disk(index_dir)
    needed_disk = max(found.disk_bytes - existing_bytes, 0)
    gib = 2**30
    summary = f"~{found.passages:,} passages from {corpus_bytes / gib:.1f} GiB of files"
    if found.ram_bytes > memory:
        advice = ("an IVF-PQ factory (--faiss IVF65536,PQ64 keeps 72 bytes a passage in memory)"
                  if found.faiss_bytes > found.ram_bytes / 2 else "a machine with more memory")
        raise CepeRagError(
            f"this run needs ~{found.ram_bytes / gib:.1f} GiB of RAM ({summary}; FAISS {factory} "
            f"{found.faiss_bytes / gib:.1f} GiB) and {memory / gib:.1f} GiB is available: use {advice}, or --force "
            "if the estimate is wrong")
    if needed_disk > disk:
        states = f", context states {found.states_bytes / gib:.1f} GiB" if found.states_bytes else ""
        raise CepeRagError(
            f"this run needs ~{needed_disk / gib:.1f} GiB of disk ({summary}; SQLite {found.sqlite_bytes / gib:.1f} "
            f"GiB{states}, FAISS {found.faiss_bytes / gib:.1f} GiB, twice while it is rewritten) and "
            f"{Path(index_dir)} has {disk / gib:.1f} GiB free: use --index on another disk"
            f"{', or leave out --context-states' if found.states_bytes else ''}, or --force if the estimate is wrong")
    return found
