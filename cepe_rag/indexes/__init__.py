"""Index folders: FAISS vectors + SQLite passages + manifest, or a manifest naming a Qdrant collection."""

from cepe_rag.lazy import lazy_exports

# FAISS loads on first use of the store, not on `import cepe_rag.indexes.layout` (the CLI's option checks).
_EXPORTS = {"IndexStore": "store", "Manifest": "store", "StoredDocument": "store", "StoredPassage": "store",
            "writer_lock": "store", "QdrantStore": "qdrant", "open_store": "qdrant", "create_or_open_store": "qdrant"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
