"""End-to-end pipelines: `indexing` (a corpus into an index folder) and `rag` (a question into an answer).

Nothing is imported here, so that `cepe-rag index` does not pay for the readers' imports and the reverse.
"""
