"""`cepe-rag serve`: an OpenAI-compatible HTTP server with dynamic batching (docs/serving.md)."""

from cepe_rag.serving.app import RagService, create_app
from cepe_rag.serving.batching import Batcher, Job, QueueFull
from cepe_rag.serving.schemas import ApiError, Limits

__all__ = ["ApiError", "Batcher", "Job", "Limits", "QueueFull", "RagService", "create_app"]
