"""Package exports loaded on first use, so importing one light module of a package does not load its heavy
siblings (FAISS for `indexes`, langchain for `documents`, the evaluation runner for `eval`)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` for `package`: each name in `exports` comes from the submodule it maps to."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
