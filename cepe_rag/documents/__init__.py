"""Sources -> documents -> passages."""

_EXPORTS = {"Document": "loading", "LoadReport": "loading", "iter_documents": "loading",
            "PassageSplitter": "splitting"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # The text splitter (langchain) loads on first use, not whenever a light helper of `loading` is imported.
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f"cepe_rag.documents.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
