"""What makes a folder an index: its files and format, known without loading FAISS (the command line checks
an --index folder before anything heavy is imported)."""

from __future__ import annotations

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
