"""An index folder's manifest (what built it, where its passages live) and its one-writer lock."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from cepe_rag.files import atomic_write
from cepe_rag.indexes.layout import FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE
from cepe_rag.settings import DEFAULT_CHUNK_TOKENS, DEFAULT_FAISS_FACTORY, DEFAULT_OVERLAP_TOKENS
from cepe_rag.types import CepeRagError


@dataclass
class Manifest:
    embedder: str
    dimension: int
    faiss_factory: str = DEFAULT_FAISS_FACTORY
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS
    metric: str = "inner_product"  # on L2-normalised embeddings, i.e. cosine similarity
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    # Where the passages live: "faiss" (this folder: SQLite + FAISS) or "qdrant" (a collection, `qdrant` says
    # where: url or path, and its name; indexes/qdrant.py). Older manifests lack both keys: FAISS.
    store: str = "faiss"
    qdrant: dict | None = None

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CepeRagError(f"{path}: unreadable manifest ({error})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise CepeRagError(f"{folder} is not a cepe-rag index (foreign manifest)")
        if data.get("format_version") != FORMAT_VERSION:
            raise CepeRagError(
                f"{folder} has index format version {data.get('format_version')}; this cepe-rag reads "
                f"version {FORMAT_VERSION}: rebuild it into a new folder"
            )
        try:
            return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})
        except TypeError as error:
            raise CepeRagError(f"{path}: incomplete manifest ({error})") from None

    def write(self, folder: Path) -> None:
        data = asdict(self)
        if self.store == "faiss":  # written as before: an older cepe-rag opens it unchanged
            del data["store"], data["qdrant"]
        atomic_write(folder / MANIFEST_FILE, json.dumps(data, indent=2).encode())

    def check_settings(self, wanted: Manifest, folder: Path, fields: tuple[str, ...]) -> Manifest:
        """This manifest (of the index in `folder`), if a run asking for `wanted` may write to it."""
        for field in fields:
            if getattr(self, field) != getattr(wanted, field):
                raise CepeRagError(f"{folder} was built with {field}={getattr(self, field)!r}, this run asks for "
                                   f"{getattr(wanted, field)!r}: use the same setting or another --index folder")
        return self

    def check_faiss(self, folder: Path) -> Manifest:
        """This manifest, if the passages are in the folder itself (not in Qdrant)."""
        if self.store != "faiss":
            raise CepeRagError(f"{folder} keeps its passages in {self.store.capitalize()} "
                               f"({self.qdrant}): this command reads only FAISS index folders")
        return self



@contextmanager
def writer_lock(folder: str | Path) -> Iterator[None]:
    """One writer per index folder: a second `cepe-rag index` on it stops at once instead of redoing the work.

    An advisory lock on the folder itself (flock on its descriptor), released by the kernel when the process
    ends, however it ends: a kill -9 never leaves a stale lock behind. Readers take no lock."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CepeRagError(f"another `cepe-rag index` is writing to {folder}: wait for it to finish, then run "
                               "this one again (it will add only what is still missing)") from None
        yield
    finally:
        os.close(descriptor)

