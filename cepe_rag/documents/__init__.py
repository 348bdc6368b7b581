"""Sources -> documents -> passages."""

from cepe_rag.documents.loading import Document, LoadReport, iter_documents
from cepe_rag.documents.splitting import PassageSplitter

__all__ = ["Document", "LoadReport", "PassageSplitter", "iter_documents"]
