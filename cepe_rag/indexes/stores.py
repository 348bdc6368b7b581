"""What the retriever, the indexer and `cepe-rag docs` ask of a passage store, and opening an index folder's store:
SQLite + FAISS in the folder itself (`IndexStore`) or a Qdrant collection its manifest names (`QdrantStore`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from cepe_rag.indexes.layout import MANIFEST_FILE, QdrantLocation, check_index_folder
from cepe_rag.indexes.manifest import Manifest
from cepe_rag.indexes.qdrant import QdrantStore
from cepe_rag.indexes.store import IndexStore, StoredPassage
from cepe_rag.types import CepeRagError, Passage


@runtime_checkable
class PassageStore(Protocol):
    """Passages with their embeddings, searched densely (and lexically where `has_lexical_index`), written a whole
    document at a time."""

    manifest: Manifest
    has_lexical_index: bool

    def count(self) -> int: ...
    def content_version(self) -> int: ...
    def search(self, query_embeddings: np.ndarray, k: int, allowed: np.ndarray | None = None
               ) -> list[list[Passage]]: ...
    def check_lexical(self) -> None: ...
    def lexical_search(self, queries: list[str], k: int, allowed: np.ndarray | None = None
                       ) -> list[list[Passage]]: ...
    def embeddings(self, ids: list[int]) -> np.ndarray: ...
    def passages(self, ids: list[int]) -> dict[int, Passage]: ...
    def matching_ids(self, source_glob: str | None = None, title_glob: str | None = None) -> np.ndarray: ...
    def passage_texts(self) -> Iterator[str]: ...
    def document_digests(self) -> dict[str, str]: ...
    def document_sources(self) -> list[tuple[str, str]]: ...
    def context_states_stamp(self) -> str | None: ...
    def context_states_count(self) -> int: ...
    def disk_bytes(self) -> int: ...
    def replace_documents(self, documents: Iterable[tuple[str, str, str]], passages: list[StoredPassage],
                          embeddings: np.ndarray, states: list[np.ndarray] | None = None) -> None: ...
    def delete_documents(self, keys: list[str]) -> int: ...
    def finish_writes(self, progress=None) -> None: ...
    def close(self) -> None: ...


def open_store(folder: str | Path, location: QdrantLocation | None = None) -> PassageStore:
    """Open an index folder for searching, wherever its passages are (its manifest says)."""
    folder = Path(folder)
    check_index_folder(folder)
    if Manifest.read(folder).store == "qdrant":
        return QdrantStore.open(folder, location)
    if location is not None:
        raise CepeRagError(f"{folder} is a FAISS index, not a Qdrant one: leave out --store/--qdrant-* options")
    return IndexStore.open(folder)


def create_or_open_store(folder: str | Path, manifest: Manifest, location: QdrantLocation | None = None
                         ) -> PassageStore:
    """Open an index folder for writing: in Qdrant when `location` is given or the folder already is a Qdrant
    index, else a FAISS index folder."""
    folder = Path(folder)
    if location is not None or (folder / MANIFEST_FILE).exists() and Manifest.read(folder).store == "qdrant":
        return QdrantStore.create_or_open(folder, manifest, location)
    return IndexStore.create_or_open(folder, manifest)
