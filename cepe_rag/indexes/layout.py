"""What makes a folder an index: its files and format, known without loading FAISS (the command line checks
an --index folder before anything heavy is imported)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cepe_rag.types import CepeRagError

FORMAT_NAME = "cepe-rag-index"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
DB_FILE = "passages.sqlite"
FAISS_FILE = "index.faiss"


def check_index_folder(folder: Path) -> None:
    """A one-line error unless `folder` holds an index manifest (what to do depends on what is there)."""
    if (folder / MANIFEST_FILE).exists():
        return
    if folder.is_dir() and any(folder.iterdir()):
        raise CepeRagError(f"{folder} is not a cepe-rag index (no {MANIFEST_FILE}); to search the documents in it, "
                           f"index them first: `cepe-rag index {folder} --index indexes/NAME`, then ask with "
                           "--index indexes/NAME")
    raise CepeRagError(f"no index at {folder}: build one with `cepe-rag index SOURCE --index {folder}`")


STORES = ("faiss", "qdrant")


@dataclass(frozen=True)
class QdrantLocation:
    """Where a Qdrant index's collection is: a server or cluster (`url`; its API key, if any, from the
    QDRANT_API_KEY environment variable, never written down) or an embedded store in a folder (`path`). Fields
    left None keep what the index folder's manifest says (by default: `qdrant/` inside the index folder, and a
    collection named after it)."""

    url: str | None = None
    path: str | None = None
    collection: str | None = None

    def __post_init__(self):
        if self.url and self.path:
            raise CepeRagError("give --qdrant-url (a server) or --qdrant-path (embedded), not both")


def stored_in(folder: Path) -> str | None:
    """Where an index folder keeps its passages ("faiss" or "qdrant"; None: no index there yet)."""
    try:
        return json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8")).get("store", "faiss")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


def check_store_options(folder: Path, store: str | None, url: str | None = None, path: str | None = None,
                        collection: str | None = None) -> QdrantLocation | None:
    """The command line's --store/--qdrant-* options against the --index folder, checked before anything heavy
    loads. Returns where to find the Qdrant collection (None: a FAISS index folder, or whatever the folder is)."""
    if store is not None and store not in STORES:
        raise CepeRagError(f"unknown store {store!r}; choose one of: {', '.join(STORES)}")
    named = url or path or collection
    if store == "faiss" and named:
        raise CepeRagError("--qdrant-url, --qdrant-path and --qdrant-collection are for --store qdrant")
    wanted = "qdrant" if named else store
    existing = stored_in(folder)
    if existing and wanted and existing != wanted:
        raise CepeRagError(f"{folder} is a {existing} index, not a {wanted} one: leave out --store/--qdrant-* "
                           "options, or choose another --index folder")
    return QdrantLocation(url, path, collection) if wanted == "qdrant" else None
