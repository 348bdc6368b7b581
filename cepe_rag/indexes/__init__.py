"""Index folders: FAISS vectors + SQLite passages + manifest."""

from cepe_rag.indexes.store import IndexStore, Manifest, StoredPassage, writer_lock

__all__ = ["IndexStore", "Manifest", "StoredPassage", "writer_lock"]
