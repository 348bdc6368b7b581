"""Opening the index and the readers once, for ask, chat, eval and serve, saying once what the index and the CPU
cannot do (an interrupted run, no BM25 index, a slow dtype)."""

from __future__ import annotations

from pathlib import Path

from cepe_rag.cli.options import quiet_libraries, warn_slow_dtype
from cepe_rag.cli.output import console, say_once
from cepe_rag.indexes.layout import QdrantLocation
from cepe_rag.indexes.stores import open_store
from cepe_rag.models import (
    default_device,
    resolve_dtype,
)
from cepe_rag.pipelines.session import RagSession
from cepe_rag.readers import GenerationConfig
from cepe_rag.retrieval import PassageFilter, Retriever
from cepe_rag.settings import (
    DEFAULT_ANSWER_TOKENS,
    DEFAULT_K,
)
from cepe_rag.types import CepeRagError


def open_session(index_dir: Path, specs: list, *, retrieval: str, source: str | None = None,
                 title: str | None = None, qdrant: QdrantLocation | None = None, device: str | None = None,
                 dtype: str | None = None, abstain: bool = True, k: int = DEFAULT_K,
                 max_new_tokens: int = DEFAULT_ANSWER_TOKENS, **generation):
    """The session every question-answering command runs on (pipelines.session.RagSession), with what the index
    and the CPU say once: an interrupted run, a missing BM25 index, stored states, a slow dtype."""

    quiet_libraries()
    retriever = open_retriever(index_dir, retrieval, source, title, qdrant)
    device = device or default_device()
    warn_slow_dtype(resolve_dtype(dtype, device), device)
    session = RagSession.open(None, specs, retriever=retriever, device=device, dtype=dtype, abstain=abstain, k=k,
                              generation=GenerationConfig(max_new_tokens=max_new_tokens, **generation))
    for note in session.notes:
        say_once(note)
    passages = retriever.store.count()
    if k > passages and any(reader.reads_passages for reader in session.readers.values()):
        console.print(f"[yellow]warning:[/] --k {k} is more than the {passages} passages in the index; reading all "
                      "of them")
    return session


def open_retriever(index_dir: Path, mode: str, source: str | None = None, title: str | None = None,
                   qdrant: QdrantLocation | None = None):
    """The index's retriever, saying once what an interrupted or older index cannot do yet."""

    retriever = Retriever(open_store(index_dir, qdrant), mode=mode, filters=PassageFilter(source=source, title=title))
    if retriever.store.faiss_is_stale:
        console.print("[yellow]warning:[/] the last indexing run was interrupted; run `cepe-rag index` again "
                      "to finish it (answering from what was committed)")
    if retriever.lexical_missing and retriever.store.backend == "qdrant":
        console.print("[dim]note: a Qdrant index has no BM25 index: searching densely[/]")
    elif retriever.lexical_missing:
        console.print("[yellow]warning:[/] this index predates lexical search: searching densely; run "
                      "`cepe-rag index` on it once to add BM25 (nothing is re-embedded)")
    if retriever.allowed is not None and len(retriever.allowed) == 0:
        raise CepeRagError(f"no passage matches --source {source!r} --title {title!r}: see `cepe-rag docs list`")
    return retriever
