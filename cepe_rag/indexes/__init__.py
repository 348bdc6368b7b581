"""Index folders: FAISS vectors + SQLite passages + manifest."""

__all__ = ["IndexStore", "Manifest", "StoredPassage", "writer_lock"]


def __getattr__(name: str):
    # FAISS loads on first use of the store, not on `import cepe_rag.indexes.layout` (the CLI's option checks).
    if name in __all__:
        from cepe_rag.indexes import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
