"""Sources -> documents -> passages."""

from cepe_rag.lazy import lazy_exports

# The text splitter (langchain) loads on first use, not whenever a light helper of `loading` is imported.
_EXPORTS = {"Document": "loading", "LoadReport": "loading", "iter_documents": "loading",
            "PassageSplitter": "splitting"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
