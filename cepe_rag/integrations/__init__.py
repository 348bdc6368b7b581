"""Thin adapters to other frameworks (LangChain)."""
