from cepe_rag.cli.app import app, main

__all__ = ["app", "main"]
