"""The FAISS file of an index folder: building an empty index from a factory string, reading one (memory-mapped
where faiss can), and what the store needs to know of an index's type (IVF, compressed, removes in place)."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from cepe_rag.types import CepeRagError

TRAINING_SAMPLE = 100_000  # embeddings an untrained factory learns from, at least
TRAINING_PER_LIST = 40  # ... and this many per IVF list (faiss warns below 39), when the index holds that many


def new_faiss_index(dimension: int, factory: str) -> faiss.Index:
    """An empty index for this factory whose ids are passage ids. IVF indexes store ids in their inverted lists
    and remove them in place, so they are used bare; the others are wrapped in an IndexIDMap2, whose id table
    (~50 bytes a vector) an IVF-PQ index of 64-byte codes would otherwise more than double."""
    index = faiss.index_factory(dimension, factory, faiss.METRIC_INNER_PRODUCT)
    if ivf_of(index) is None:
        index = faiss.index_factory(dimension, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
    inner = innermost(index)
    if hasattr(inner, "do_polysemous_training"):
        # The factory turns on polysemous training for PQ codes: minutes of simulated annealing, for a Hamming
        # filter that this store never uses (measured: 184 s of a 221 s IVF64,PQ32 training on 5k vectors).
        inner.do_polysemous_training = False
    return index


def training_size(index: faiss.Index, total: int) -> int:
    """How many stored embeddings an untrained index learns from: at least 100k, and 40 per IVF list."""
    ivf = ivf_of(index)
    return min(total, max(TRAINING_SAMPLE, TRAINING_PER_LIST * ivf.nlist if ivf is not None else 0))


def read_faiss(path: Path, *, mapped: bool) -> tuple[faiss.Index | None, bool]:
    """(the index, whether it was read with a memory-mapping flag); (None, False) for a corrupt or truncated file.
    `mapped` asks for a memory-mapping where this faiss can make one, falling back to reading it into memory. In
    faiss 1.15 IO_FLAG_MMAP_IFC maps Flat, PQ and SQ codes, HNSW storage and IVF lists alike (measured: a 294 MiB
    Flat or IVF-Flat file opens with 12 MiB resident); IO_FLAG_MMAP maps IVF lists only. A version that accepts a
    flag without mapping still returns a correct index, then flagged as mapped, which only makes it read-only."""
    flags = [getattr(faiss, name) for name in ("IO_FLAG_MMAP_IFC", "IO_FLAG_MMAP") if mapped and hasattr(faiss, name)]
    for flag in [*flags, 0]:
        try:
            return faiss.read_index(str(path), flag), flag != 0
        except RuntimeError:
            continue  # this index type cannot be mapped that way (or the file is corrupt: the last try says)
    return None, False


def innermost(index: faiss.Index) -> faiss.Index:
    """The index under its id map and transforms (an HNSW index's storage), downcast to its real type."""
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexHNSW):
        index = faiss.downcast_index(index.storage)
    return index


def compressed(index: faiss.Index) -> bool:
    """Whether the index scores with lossy codes (PQ, SQ, ...) rather than the full vectors."""
    return not isinstance(innermost(index), (faiss.IndexFlat, faiss.IndexIVFFlat))


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def removes_in_place(index: faiss.Index) -> bool:
    """Whether `remove_ids` keeps the other passages' ids right: an IVF index (ids in its lists), or an IDMap2
    over a Flat one (IDMap2 removal shifts inner ids, which only a Flat index follows); others are rebuilt."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap2):  # (an index written before IVF indexes were used bare is one too)
        return isinstance(faiss.downcast_index(index.index), faiss.IndexFlat)
    return ivf_of(index) is not None


def selecting(index: faiss.Index, allowed: np.ndarray) -> faiss.SearchParameters:
    """Search parameters restricting a search to these ids. An IVF index takes only IVF parameters, which carry
    their own nprobe: the index's is passed on, or the search would probe one list."""
    selector = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
    ivf = ivf_of(index)
    if ivf is None:
        return faiss.SearchParameters(sel=selector)
    return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)


def stack(parts: list[np.ndarray], dimension: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty((0, dimension), np.float32)


def set_search_defaults(index: faiss.Index) -> None:
    """faiss probes one IVF list by default, which misses too much; probe up to 32."""
    ivf = ivf_of(index)
    if ivf is not None:
        ivf.nprobe = min(ivf.nlist, 32)


def on_gpu_if_available(index: faiss.Index) -> faiss.Index:
    """Search on the GPUs when faiss-gpu is installed and sees one; otherwise (or if it fails) on the CPU."""
    if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError:  # not every index type has a GPU version
        return index


def check_factory_syntax(factory: str) -> None:
    """Refuse an unknown FAISS factory before any model loads; the check against the real width comes later.

    20160 = 2^6 * 3^2 * 5 * 7 is divisible by every usual PQ/OPQ sub-quantizer count."""
    validate_factory(factory, 20160)


def validate_factory(factory: str, dimension: int) -> None:
    try:
        faiss.index_factory(dimension, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise CepeRagError(f"invalid faiss factory string {factory!r} (examples: Flat, HNSW32, IVF1024,PQ32)") from None
