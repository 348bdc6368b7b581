"""`cepe-rag docs`: list, show and remove the documents of an index.

They read SQLite only and load no model, so each takes well under a second on any index (`remove` also
rewrites the FAISS file, as `index` does). Paths are matched the way `index --include/--exclude` matches them
(documents/globs.py), so `docs list --source GLOB` previews what `docs remove GLOB` would remove.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cepe_rag.documents.globs import compile_glob, is_glob, path_matches
from cepe_rag.indexes.layout import FAISS_FILE, check_index_folder
from cepe_rag.indexes.manifest import Manifest, writer_lock
from cepe_rag.indexes.store import IndexStore
from cepe_rag.settings import DEFAULT_INDEX
from cepe_rag.types import CepeRagError

docs_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="List, show and remove the documents of an index (no model loads).")
console = Console(stderr=True, soft_wrap=True)  # one message, one line
IndexOption = Annotated[Path, typer.Option("--index", help="Index folder.")]
MAX_LISTED = 20  # sources named after a removal; the rest are counted
MAX_TITLE_WIDTH = 60


@docs_app.command("list")
def list_documents(
    index_dir: IndexOption = DEFAULT_INDEX,
    source: Annotated[str | None, typer.Option(
        help="Only documents whose source path matches this glob: '*.md', 'notes/**', 'corpus/a.txt' (the end "
             "of the path is enough).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """One row per document (source, title, passages, id, digest), then the index's statistics."""
    pattern = compile_glob(source, anywhere=True) if source is not None else None
    store = _open_catalog(index_dir)
    try:
        documents = store.document_list()
        statistics = {
            "documents": len(documents), "passages": store.count(), "embedder": store.manifest.embedder,
            "faiss_factory": store.manifest.faiss_factory, "chunk_tokens": store.manifest.chunk_tokens,
            "overlap_tokens": store.manifest.overlap_tokens, "content_version": store.content_version(),
            "disk_bytes": store.disk_bytes(), "faiss_up_to_date": not store.faiss_is_stale,
        }
    finally:
        store.close()
    shown = documents if pattern is None else [d for d in documents if _glob_matches(pattern, d)]
    if as_json:
        print(json.dumps({"index": str(index_dir), "statistics": statistics,
                          "documents": [asdict(d) for d in shown]}, ensure_ascii=False))
        return
    if shown:
        ids = [_record_id(d) for d in shown]
        header = ["source", "title", "passages", *(["id"] if any(ids) else []), "digest"]
        rows = [[_display_path(d.source), _shorten(d.title), str(d.passages), *([i] if any(ids) else []), d.digest[:12]]
                for d, i in zip(shown, ids)]
        print_columns(header, rows, right_aligned={"passages"})
    if pattern is not None:
        print(f"{len(shown)} of {len(documents)} documents match {source!r}")
    elif not documents:
        print("no documents")
    s = statistics
    print(f"{index_dir}: {s['documents']:,} documents, {s['passages']:,} passages · embedder {s['embedder']} · "
          f"faiss {s['faiss_factory']} · chunks of {s['chunk_tokens']} tokens ({s['overlap_tokens']} overlap) · "
          f"content version {s['content_version']} · {s['disk_bytes'] / 2**20:.1f} MiB on disk"
          + ("" if s["faiss_up_to_date"] else " · the FAISS file is behind: `cepe-rag index` brings it up to date"))


@docs_app.command("show")
def show(
    source: Annotated[str, typer.Argument(
        help="The document's source path, exact or a unique end of it ('notes/a.md'), or its key "
             "('corpus.jsonl#7') as `docs list` shows it.")],
    index_dir: IndexOption = DEFAULT_INDEX,
) -> None:
    """A document's passages, in order: position, title and text."""
    store = _open_catalog(index_dir)
    try:
        found = find_by_path(store.document_list(), source)
        if not found:
            raise CepeRagError(f"no document in {index_dir} matches {source!r}: `cepe-rag docs list --index "
                               f"{index_dir}` lists them")
        if len(found) > 1:
            raise CepeRagError(f"{source!r} matches {len(found)} documents ({_some(d.key for d in found)}): name one "
                               "by its path, or a record of a JSON/JSONL file by its key (source#id)")
        document = found[0]
        passages = store.document_passages(document.key)
    finally:
        store.close()
    print(f"{document.key} · {len(passages)} passage{'s' * (len(passages) != 1)} · digest {document.digest[:12]}")
    for passage in passages:
        print(f"\n[{passage.position}] {passage.title}\n{passage.text}")


@docs_app.command("remove")
def remove(
    targets: Annotated[list[str], typer.Argument(
        help="Source paths (exact, a unique end of one, or a folder), keys, or globs ('drafts/**', '*.pdf'); "
             "preview a glob with `docs list --source GLOB`.")],
    index_dir: IndexOption = DEFAULT_INDEX,
) -> None:
    """Remove documents and their passages from the index; nothing changes unless every argument matches."""
    patterns = {t: compile_glob(t, anywhere=True) for t in targets if is_glob(t)}  # bad ones stop here
    check_index_folder(index_dir)  # before the lock, which would create a missing folder
    with writer_lock(index_dir):  # the lock `index` takes: never two writers
        store = IndexStore.create_or_open(index_dir, Manifest.read(index_dir))
        try:
            documents = store.document_list()
            chosen: dict[str, str] = {}
            for target in targets:
                found = ([d for d in documents if _glob_matches(patterns[target], d)] if target in patterns
                         else find_by_path(documents, target))
                if not found:
                    raise CepeRagError(f"no document in {index_dir} matches {target!r}; nothing was removed "
                                       f"(`cepe-rag docs list --index {index_dir}` lists them)")
                chosen.update((d.key, d.source) for d in found)
            removed_passages = store.delete_documents(list(chosen))
            # As `index` does after its commits: SQLite changed first, FAISS follows (rebuilt if it cannot).
            if store.count() or (store.folder / FAISS_FILE).exists():
                store.commit_faiss()
            left_documents, left_passages = len(documents) - len(chosen), store.count()
        finally:
            store.close()
    sources = sorted(set(chosen.values()))
    for path in sources[:MAX_LISTED]:
        console.print(f"removed {path}", highlight=False, markup=False)
    if len(sources) > MAX_LISTED:
        console.print(f"... and {len(sources) - MAX_LISTED} more files", highlight=False)
    console.print(f"{index_dir}: removed {len(chosen)} document{'s' * (len(chosen) != 1)} ({removed_passages} "
                  f"passages); {left_documents} documents, {left_passages} passages left", highlight=False,
                  markup=False)
    on_disk = sum(os.path.isfile(path) for path in sources)
    if on_disk:
        console.print(f"{on_disk} of these files still exist: the next `cepe-rag index` of their folder adds them "
                      "back unless they are deleted or left out with --exclude", highlight=False)


def find_by_path(documents: list, argument: str) -> list:
    """Documents named by a path: an exact key or source (as given or made absolute), the documents under a folder,
    or else those whose key or source ends with the argument at a '/' boundary, if they all end the same path
    (two different files ending in 'a.txt' are ambiguous: a one-line error)."""
    wanted = {argument, os.path.abspath(argument)}
    exact = [d for d in documents if d.key in wanted or d.source in wanted]
    if exact:
        return exact
    folders = tuple(w.rstrip("/") + "/" for w in wanted)
    under = [d for d in documents if d.source.startswith(folders)]
    if under:
        return under
    tail = argument.removeprefix("./").strip("/")
    by_path: dict[str, list] = {}
    for document in documents:
        anchor = _ending_at_boundary(document.key, tail) or _ending_at_boundary(document.source, tail)
        if anchor:
            by_path.setdefault(anchor, []).append(document)
    if len(by_path) > 1:
        raise CepeRagError(f"{argument!r} is the end of {len(by_path)} paths ({_some(by_path)}): give more of the "
                           "path, or a glob to take them all")
    return next(iter(by_path.values()), [])


def _ending_at_boundary(path: str, tail: str) -> str | None:
    """The part of `path` up to where `tail` ends, when `tail` covers whole segments of it ('b/c.txt' of
    '/a/b/c.txt', 'c.jsonl' of '/a/c.jsonl#7'), else None."""
    if not tail:
        return None
    start = path.find(tail)
    while start != -1:
        end = start + len(tail)
        if (start == 0 or path[start - 1] == "/") and (end == len(path) or path[end] in "/#"):
            return path[:end]
        start = path.find(tail, start + 1)
    return None


def _glob_matches(pattern, document) -> bool:
    # Stored paths are absolute; the patterns match from any '/' on, or from the root when they start with '/'.
    return path_matches(pattern, document.source.lstrip("/")) or bool(pattern.fullmatch(document.key.lstrip("/")))


def _open_catalog(index_dir: Path):
    return IndexStore.open_catalog(index_dir)


def print_columns(header: list[str], rows: list[list[str]], *, right_aligned: set[str]) -> None:
    """Plain aligned columns: a rich Table takes seconds to lay out 10,000 rows, this takes milliseconds, and
    each row stays one line whatever the terminal width (for grep)."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        cells = [cell.rjust(width) if name in right_aligned else cell.ljust(width)
                 for name, cell, width in zip(header, row, widths)]
        print("  ".join(cells).rstrip())


def _shorten(title: str) -> str:
    title = " ".join(title.split())
    return title if len(title) <= MAX_TITLE_WIDTH else title[:MAX_TITLE_WIDTH - 1] + "…"


def _record_id(document) -> str:
    return document.key[len(document.source):] if document.key.startswith(document.source) else document.key


def _display_path(path: str) -> str:
    """Relative to the current folder when inside it (shorter rows); else as stored."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return path
    return path if relative.startswith("..") else relative


def _some(items, shown: int = 3) -> str:
    items = sorted(items)
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")
