"""cepe-rag: retrieval-augmented generation that reads many passages through CEPE."""

from cepe_rag.types import Answer, Passage

__all__ = ["Answer", "Passage"]
__version__ = "0.1.0"
