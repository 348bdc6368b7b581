"""Index folders: FAISS vectors + SQLite passages + manifest, or a manifest naming a Qdrant collection."""

from cepe_rag.lazy import lazy_exports

# FAISS loads on first use of the store, not on `import cepe_rag.indexes.layout` (the CLI's option checks).
_EXPORTS = {"IndexStore": "store", "Manifest": "manifest", "StoredDocument": "store", "StoredPassage": "store",
            "writer_lock": "manifest", "QdrantStore": "qdrant", "PassageStore": "stores",
            "open_store": "stores", "create_or_open_store": "stores"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
