"""An index folder: FAISS vectors + SQLite passages + a JSON manifest. No pickle anywhere.

SQLite is the source of truth: it holds every passage with its embedding, and each document with its
passages is committed in one transaction. Lexical (BM25) search is SQLite's FTS5 over the same rows, kept
up to date by triggers inside those transactions, so it is incremental and as kill -9 safe as the passages.
The FAISS file is derived from SQLite and stamped with the content version it was built from; a stale or
missing FAISS file is rebuilt from SQLite without re-embedding anything.
So a run killed at any moment leaves a usable index, and the next run resumes.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import faiss
import numpy as np

from cepe_rag.files import atomic_write, atomic_write_with
from cepe_rag.indexes.layout import DB_FILE, FAISS_FILE, FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, check_index_folder
from cepe_rag.settings import (
    CONTEXT_STATE_FORMATS,
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_FAISS_FACTORY,
    DEFAULT_OVERLAP_TOKENS,
    check_choice,
)
from cepe_rag.types import CepeRagError, Passage

_TRAINING_SAMPLE = 100_000  # embeddings an untrained factory learns from, at least
_TRAINING_PER_LIST = 40  # ... and this many per IVF list (faiss warns below 39), when the index holds that many
_RERANK = 4  # a compressed index (PQ, SQ) proposes this many times k passages, re-scored on the stored embeddings
_BUILD_BATCH = 8192  # embeddings read from SQLite and added to FAISS at a time
_PAGE_SIZE = 16384  # SQLite page of a new index: a 4 KiB page holds one ~2.2 KB passage row, a 16 KiB one seven

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (key TEXT PRIMARY KEY, digest TEXT NOT NULL, source TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS passages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_key TEXT NOT NULL REFERENCES documents(key),
    position INTEGER NOT NULL,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    source TEXT NOT NULL,
    embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS passages_by_document ON passages(doc_key);
"""

# CEPE encoder states per passage (float16, tokens x hidden), written in the passages' own transactions and
# removed with them; meta `context_states_encoder` stamps the encoder that made them.
_STATES_SCHEMA = """
CREATE TABLE IF NOT EXISTS context_states (
    passage_id INTEGER PRIMARY KEY REFERENCES passages(id) ON DELETE CASCADE,
    tokens INTEGER NOT NULL,
    states BLOB NOT NULL
);
"""
STATES_TABLE = "context_states"
STATES_STAMP_KEY = "context_states_encoder"
STATES_FORMAT_KEY = "context_states_format"  # float16, or int8 with one float32 scale per token (half the bytes)

# External-content FTS5: the text lives once, in `passages`; the triggers keep the BM25 index in the same transaction.
_LEXICAL_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS passages_fts USING fts5(
    title, text, content='passages', content_rowid='id', tokenize='porter unicode61 remove_diacritics 2');
CREATE TRIGGER IF NOT EXISTS passages_fts_insert AFTER INSERT ON passages BEGIN
    INSERT INTO passages_fts(rowid, title, text) VALUES (new.id, new.title, new.text);
END;
CREATE TRIGGER IF NOT EXISTS passages_fts_delete AFTER DELETE ON passages BEGIN
    INSERT INTO passages_fts(passages_fts, rowid, title, text) VALUES ('delete', old.id, old.title, old.text);
END;
"""
LEXICAL_TABLE = "passages_fts"

# Words that match most passages and carry no meaning for BM25; dropping them keeps OR queries fast.
_STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
him his how i if in into is it its itself just me more most my no nor not now of off on once only or other our
out over own same she should so some such than that the their them then there these they this those through to
too under until up very was we were what when where which while who whom why will with would you your
""".split())


@dataclass
class Manifest:
    embedder: str
    dimension: int
    faiss_factory: str = DEFAULT_FAISS_FACTORY
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    overlap_tokens: int = DEFAULT_OVERLAP_TOKENS
    metric: str = "inner_product"  # on L2-normalised embeddings, i.e. cosine similarity
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    # Where the passages live: "faiss" (this folder: SQLite + FAISS) or "qdrant" (a collection, `qdrant` says
    # where: url or path, and its name; indexes/qdrant.py). Older manifests lack both keys: FAISS.
    store: str = "faiss"
    qdrant: dict | None = None

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CepeRagError(f"{path}: unreadable manifest ({error})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise CepeRagError(f"{folder} is not a cepe-rag index (foreign manifest)")
        if data.get("format_version") != FORMAT_VERSION:
            raise CepeRagError(
                f"{folder} has index format version {data.get('format_version')}; this cepe-rag reads "
                f"version {FORMAT_VERSION}: rebuild it into a new folder"
            )
        try:
            return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})
        except TypeError as error:
            raise CepeRagError(f"{path}: incomplete manifest ({error})") from None

    def write(self, folder: Path) -> None:
        data = asdict(self)
        if self.store == "faiss":  # written as before: an older cepe-rag opens it unchanged
            del data["store"], data["qdrant"]
        atomic_write(folder / MANIFEST_FILE, json.dumps(data, indent=2).encode())

    def check_settings(self, wanted: Manifest, folder: Path, fields: tuple[str, ...]) -> Manifest:
        """This manifest (of the index in `folder`), if a run asking for `wanted` may write to it."""
        for field in fields:
            if getattr(self, field) != getattr(wanted, field):
                raise CepeRagError(f"{folder} was built with {field}={getattr(self, field)!r}, this run asks for "
                                   f"{getattr(wanted, field)!r}: use the same setting or another --index folder")
        return self

    def check_faiss(self, folder: Path) -> Manifest:
        """This manifest, if the passages are in the folder itself (not in Qdrant)."""
        if self.store != "faiss":
            raise CepeRagError(f"{folder} keeps its passages in {self.store.capitalize()} "
                               f"({self.qdrant}): this command reads only FAISS index folders")
        return self


@dataclass
class StoredPassage:
    doc_key: str
    position: int
    title: str
    text: str
    source: str


@dataclass
class StoredDocument:
    """One document of the index, as `cepe-rag docs` lists it."""

    key: str
    source: str
    digest: str
    passages: int
    title: str  # its first passage's


class IndexStore:
    """Open with `IndexStore.open(folder)` to search, `IndexStore.create_or_open(...)` to write."""

    backend = "faiss"

    def __init__(self, folder: Path, manifest: Manifest, db: sqlite3.Connection):
        self.folder = folder
        self.manifest = manifest
        self.db = db
        self._faiss: faiss.Index | None = None
        self.faiss_is_stale = False
        self.faiss_is_mapped = False  # memory-mapped from the file: read-only, a change rebuilds it
        self.has_lexical_index = _has_table(db, LEXICAL_TABLE)
        self.has_context_states = _has_table(db, STATES_TABLE)  # the table: an older index has none

    # --- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | Path) -> IndexStore:
        """Open an existing index for reading; every problem is a one-line CepeRagError."""
        folder = Path(folder)
        check_index_folder(folder)
        manifest = Manifest.read(folder).check_faiss(folder)
        store = cls(folder, manifest, _connect(folder / DB_FILE, create=False))
        store._load_faiss(required=True)
        return store

    @classmethod
    def create_or_open(cls, folder: str | Path, manifest: Manifest) -> IndexStore:
        """Open for writing, creating the folder; refuses a folder written for other settings."""
        folder = Path(folder)
        if (folder / MANIFEST_FILE).exists():
            manifest = Manifest.read(folder).check_faiss(folder).check_settings(
                manifest, folder, ("embedder", "dimension", "faiss_factory", "chunk_tokens", "overlap_tokens"))
        elif folder.exists() and any(folder.iterdir()):
            raise CepeRagError(f"{folder} is not empty and is not a cepe-rag index: choose another --index folder")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            _validate_factory(manifest.faiss_factory, manifest.dimension)
            manifest.write(folder)
        store = cls(folder, manifest, _connect(folder / DB_FILE, create=True))
        store._load_faiss(required=False)
        if store._faiss is None and store.count() == 0:
            # Untrained factories (IVF, PQ) are built and trained at the end, from a sample of the data.
            store._faiss = new_faiss_index(manifest.dimension, manifest.faiss_factory)
        return store

    @classmethod
    def open_catalog(cls, folder: str | Path) -> IndexStore:
        """Open an existing index to list and read its documents: SQLite only, so it takes the same few
        milliseconds on any size of index. `search` is not available on it; `faiss_is_stale` is read from the
        metadata (the FAISS file is not loaded, so a corrupt one is not noticed here)."""
        folder = Path(folder)
        check_index_folder(folder)
        store = cls(folder, Manifest.read(folder).check_faiss(folder), _connect(folder / DB_FILE, create=False))
        store.faiss_is_stale = store.count() > 0 and (
            not (folder / FAISS_FILE).exists() or store._meta("faiss_version") != store._meta("content_version"))
        return store

    def _load_faiss(self, *, required: bool) -> None:
        """Load the FAISS file. Reading (`required`), it is memory-mapped where faiss can (its vectors stay in the
        page cache, shared by every process that searches the index, and paged in from disk on demand), and a
        missing, corrupt or stale file (an interrupted `index` run) is replaced by one rebuilt in memory from the
        committed embeddings, so every committed passage is searchable; nothing is written, and `faiss_is_stale`
        tells the caller to say so. Writing, it is read into memory, since it will change."""
        path = self.folder / FAISS_FILE
        self.faiss_is_stale = self._meta("faiss_version") != self._meta("content_version")
        index = None
        if path.exists():
            index, self.faiss_is_mapped = read_faiss(path, mapped=required)
        if index is None:
            self.faiss_is_stale = self.count() > 0
        elif index.d != self.manifest.dimension:
            raise CepeRagError(f"{path} holds {index.d}-d vectors, the manifest says {self.manifest.dimension}")
        if required and self.faiss_is_stale:
            index, self.faiss_is_mapped = self._build_faiss(), False
        if index is None:
            return
        _set_search_defaults(index)
        self._faiss = _on_gpu_if_available(index) if required else index

    # --- reading -------------------------------------------------------------------------------

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM passages").fetchone()[0]

    def content_version(self) -> int:
        """Bumped by every committed change, so a cache of search results can tell that it is stale."""
        return int(self._meta("content_version") or 0)

    def search(self, query_embeddings: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[list[Passage]]:
        """Top-k passages for each query embedding (rows L2-normalised), best first; only `allowed` ids if given."""
        if self._faiss is None or self._faiss.ntotal == 0:
            raise CepeRagError(f"the index at {self.folder} is empty: add documents with `cepe-rag index`")
        k = max(1, min(k, self._faiss.ntotal))
        queries = np.ascontiguousarray(query_embeddings, dtype=np.float32)
        compressed = _compressed(self._faiss)
        candidates = min(k * _RERANK, self._faiss.ntotal) if compressed else k
        if allowed is None:
            scores, ids = self._faiss.search(queries, candidates)
        elif len(allowed) == 0:
            return [[] for _ in queries]
        else:
            try:  # exact filtering inside FAISS (Flat, IVF, HNSW on the CPU)
                scores, ids = self._faiss.search(queries, candidates, params=_selecting(self._faiss, allowed))
            except (RuntimeError, TypeError):
                raise CepeRagError("this FAISS index cannot filter passages (a GPU index?); search without "
                                   "filters or on the CPU") from None
        if compressed:
            scores, ids = self._rescore(queries, ids, k)
        found = self.passages([int(i) for i in ids.ravel() if i >= 0])
        results = []
        for row_scores, row_ids in zip(scores, ids):
            # An id missing from SQLite means an interrupted update: the passage is gone, skip it.
            results.append([replace(found[int(i)], score=float(s))
                            for s, i in zip(row_scores, row_ids) if i >= 0 and int(i) in found])
        return results

    def _rescore(self, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best of a compressed index's candidates by exact inner product on their stored embeddings (the
        codes' approximate scores misorder close passages); one SQLite read for all queries' candidates."""
        wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
        stored = dict(zip(wanted, self.embeddings(wanted))) if wanted else {}
        scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
        best = np.full((len(ids), k), -1, dtype=np.int64)
        for row, (query, row_ids) in enumerate(zip(queries, ids)):
            row_ids = np.array([i for i in row_ids if i >= 0 and int(i) in stored], dtype=np.int64)
            if len(row_ids) == 0:
                continue
            exact = np.stack([stored[int(i)] for i in row_ids]) @ query
            order = np.argsort(-exact, kind="stable")[:k]
            scores[row, :len(order)], best[row, :len(order)] = exact[order], row_ids[order]
        return scores, best

    def lexical_search(self, queries: list[str], k: int, allowed: np.ndarray | None = None) -> list[list[Passage]]:
        """BM25 top-k passages for each query (FTS5, porter stemming), best first; score = BM25 (higher is better)."""
        self.check_lexical()
        restrict = ""
        if allowed is not None:
            restrict = f" AND rowid IN ({','.join(str(int(i)) for i in allowed) or 'NULL'})"
        results = []
        for query in queries:
            match = lexical_query(query)
            if not match:
                results.append([])
                continue
            rows = self.db.execute(
                f"SELECT rowid, -bm25({LEXICAL_TABLE}) FROM {LEXICAL_TABLE} WHERE {LEXICAL_TABLE} MATCH ?{restrict} "
                f"ORDER BY bm25({LEXICAL_TABLE}) LIMIT ?", (match, max(1, k))).fetchall()
            found = self.passages([pid for pid, _ in rows])
            results.append([replace(found[pid], score=float(score)) for pid, score in rows if pid in found])
        return results

    def check_lexical(self) -> None:
        if not self.has_lexical_index:
            raise CepeRagError(f"the index at {self.folder} was built before lexical search existed: run "
                               "`cepe-rag index` on it once to add it (nothing is re-embedded)")

    def embeddings(self, ids: list[int]) -> np.ndarray:
        """The stored embeddings of these passages, in the order given (ids must exist)."""
        found = dict(self._rows_by_id("SELECT id, embedding FROM passages", ids))
        return np.array([np.frombuffer(found[i], dtype=np.float32) for i in ids], dtype=np.float32).reshape(
            len(ids), self.manifest.dimension)

    def unknown_words(self, text: str) -> list[str]:
        """The words of `text` (stopwords aside) that no passage contains, after the lexical index's stemming."""
        return [w for w in query_words(text) if self.db.execute(
            f"SELECT 1 FROM {LEXICAL_TABLE} WHERE {LEXICAL_TABLE} MATCH ? LIMIT 1", (f'"{w}"',)).fetchone() is None]

    def matching_ids(self, source_glob: str | None = None, title_glob: str | None = None) -> np.ndarray:
        """Ids of the passages whose source path and title match these globs (case-sensitive, `*` and `?`)."""
        clauses, values = [], []
        for column, pattern in (("source", source_glob), ("title", title_glob)):
            if pattern:
                clauses.append(f"{column} GLOB ?")
                values.append(pattern)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        return np.array([row[0] for row in self.db.execute(f"SELECT id FROM passages{where}", values)], dtype=np.int64)

    def passage_texts(self) -> Iterator[str]:
        """Every passage as "title text", for scans over the whole corpus."""
        for (text,) in self.db.execute("SELECT title || ' ' || text FROM passages"):
            yield text

    def document_sources(self) -> list[tuple[str, str]]:
        """(document key, source path) of every document."""
        return self.db.execute("SELECT key, source FROM documents").fetchall()

    def passages(self, ids: list[int]) -> dict[int, Passage]:
        return {pid: Passage(id=pid, text=text, title=title, source=source)
                for pid, text, title, source in self._rows_by_id("SELECT id, text, title, source FROM passages", ids)}

    def _rows_by_id(self, select: str, ids: list[int], id_column: str = "id") -> Iterator[tuple]:
        """`select` restricted to these ids, in chunks under SQLite's bound-parameter limit."""
        for start in range(0, len(ids), 900):
            chunk = ids[start:start + 900]
            yield from self.db.execute(f"{select} WHERE {id_column} IN ({','.join('?' * len(chunk))})", chunk)

    def document_list(self) -> list[StoredDocument]:
        """Every document with its passage count and first passage's title, by source then key."""
        rows = self.db.execute(
            "SELECT d.key, d.source, d.digest, COUNT(p.id), "
            "(SELECT title FROM passages WHERE doc_key = d.key ORDER BY position LIMIT 1) "
            "FROM documents d LEFT JOIN passages p ON p.doc_key = d.key GROUP BY d.key ORDER BY d.source, d.key"
        )
        return [StoredDocument(key, source, digest, count, title or "") for key, source, digest, count, title in rows]

    def document_passages(self, key: str) -> list[StoredPassage]:
        """A document's passages in their order in the document."""
        rows = self.db.execute(
            "SELECT doc_key, position, title, text, source FROM passages WHERE doc_key = ? ORDER BY position", (key,))
        return [StoredPassage(*row) for row in rows]

    def export_documents(self) -> Iterator[tuple[tuple[str, str, str], list[StoredPassage], np.ndarray]]:
        """Every document as ((key, digest, source), its passages in order, their embeddings): to copy an index
        without re-embedding it (`cepe-rag index --from-index`). One pass over SQLite, one document in memory."""
        rows = self.db.execute(
            "SELECT d.key, d.digest, d.source, p.position, p.title, p.text, p.source, p.embedding FROM documents d "
            "JOIN passages p ON p.doc_key = d.key ORDER BY d.key, p.position")
        current, passages, vectors = None, [], []
        for key, digest, source, position, title, text, passage_source, vector in rows:
            if current is not None and current[0] != key:
                yield current, passages, np.array(vectors, dtype=np.float32)
                passages, vectors = [], []
            current = (key, digest, source)
            passages.append(StoredPassage(key, position, title, text, passage_source))
            vectors.append(np.frombuffer(vector, dtype=np.float32))
        if current is not None:
            yield current, passages, np.array(vectors, dtype=np.float32)

    def document_digests(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, digest FROM documents"))

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.folder.iterdir() if f.is_file())

    # --- writing -------------------------------------------------------------------------------

    def replace_documents(self, documents: Iterable[tuple[str, str, str]], passages: list[StoredPassage],
                          embeddings: np.ndarray, states: list[np.ndarray] | None = None) -> None:
        """Commit (key, digest, source) documents with their passages (and, given, their context states) in one
        transaction."""
        documents = list(documents)
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        was_stale, self.faiss_is_stale = self.faiss_is_stale, True  # until FAISS has caught up with this commit
        with self.db:
            removed = self._delete_passages([key for key, _, _ in documents])
            self.db.executemany("INSERT OR REPLACE INTO documents(key, digest, source) VALUES (?, ?, ?)", documents)
            ids = []
            for passage, vector in zip(passages, embeddings):
                cursor = self.db.execute(
                    "INSERT INTO passages(doc_key, position, title, text, source, embedding) VALUES (?, ?, ?, ?, ?, ?)",
                    (passage.doc_key, passage.position, passage.title, passage.text, passage.source, vector.tobytes()),
                )
                ids.append(cursor.lastrowid)
            if states is not None:
                self._insert_states(ids, states)
            self._bump_content_version()
        # FAISS follows only after the commit succeeded, so it never holds uncommitted ids.
        self._faiss_update(was_stale, removed, np.array(ids, dtype=np.int64), embeddings)

    # --- context states ----------------------------------------------------------------------------

    def context_states_stamp(self) -> str | None:
        """What made the stored context states (None: the index holds none)."""
        return self._meta(STATES_STAMP_KEY) if self.has_context_states else None

    def set_context_states_stamp(self, stamp: str, state_format: str = "float16") -> None:
        """Claim the index's context states for an encoder and a storage format; states of another encoder or
        format are dropped first."""
        check_choice(state_format, CONTEXT_STATE_FORMATS, "context state format")
        with self.db:
            if (self._meta(STATES_STAMP_KEY), self.context_states_format()) not in ((None, "float16"),
                                                                                    (stamp, state_format)):
                self.db.execute(f"DELETE FROM {STATES_TABLE}")
            self._set_meta(STATES_STAMP_KEY, stamp)
            self._set_meta(STATES_FORMAT_KEY, state_format)

    def context_states_format(self) -> str:
        return self._meta(STATES_FORMAT_KEY) or "float16"  # indexes from before the int8 option: float16

    def passages_without_states(self, limit: int) -> list[Passage]:
        rows = self.db.execute(
            "SELECT id, text, title, source FROM passages WHERE id NOT IN (SELECT passage_id FROM context_states) "
            "ORDER BY id LIMIT ?", (limit,))
        return [Passage(id=pid, text=text, title=title, source=source) for pid, text, title, source in rows]

    def add_context_states(self, ids: list[int], states: list[np.ndarray]) -> None:
        with self.db:
            self._insert_states(ids, states)

    def passage_ids_with_states(self) -> list[int]:
        if not self.has_context_states:
            return []
        return [row[0] for row in self.db.execute(f"SELECT passage_id FROM {STATES_TABLE} ORDER BY passage_id")]

    def context_states_count(self) -> int:
        return self.db.execute(f"SELECT COUNT(*) FROM {STATES_TABLE}").fetchone()[0] if self.has_context_states else 0

    def context_states(self, ids: list[int], hidden_size: int) -> dict[int, np.ndarray]:
        """The stored float16 (tokens, hidden) states of these passages (those that have them); read from disk
        per request, never all at once."""
        if not self.has_context_states:
            return {}
        rows = self._rows_by_id(f"SELECT passage_id, tokens, states FROM {STATES_TABLE}", ids, "passage_id")
        unpack = _unpack_int8 if self.context_states_format() == "int8" else _unpack_float16
        return {pid: unpack(blob, tokens, hidden_size) for pid, tokens, blob in rows}

    def _insert_states(self, ids: list[int], states: list[np.ndarray]) -> None:
        pack = _pack_int8 if self.context_states_format() == "int8" else _pack_float16
        self.db.executemany("INSERT OR REPLACE INTO context_states(passage_id, tokens, states) VALUES (?, ?, ?)",
                            [(pid, len(s), pack(s)) for pid, s in zip(ids, states)])

    def delete_documents(self, keys: list[str]) -> int:
        was_stale, self.faiss_is_stale = self.faiss_is_stale, True
        with self.db:
            removed = self._delete_passages(keys)
            for start in range(0, len(keys), 900):
                chunk = keys[start:start + 900]
                self.db.execute(f"DELETE FROM documents WHERE key IN ({','.join('?' * len(chunk))})", chunk)
            self._bump_content_version()
        self._faiss_update(was_stale, removed, np.empty(0, dtype=np.int64),
                           np.empty((0, self.manifest.dimension), np.float32))
        return len(removed)

    def _delete_passages(self, keys: list[str]) -> list[int]:
        removed: list[int] = []
        for start in range(0, len(keys), 900):
            chunk = keys[start:start + 900]
            marks = ",".join("?" * len(chunk))
            removed += [row[0] for row in self.db.execute(f"SELECT id FROM passages WHERE doc_key IN ({marks})", chunk)]
            self.db.execute(f"DELETE FROM passages WHERE doc_key IN ({marks})", chunk)
        return removed

    def _faiss_update(self, was_stale: bool, removed: list[int], ids: np.ndarray, embeddings: np.ndarray) -> None:
        """Apply a committed change to the in-memory FAISS index; if it cannot be, rebuild it at the end."""
        if was_stale or self._faiss is None or not self._faiss.is_trained or self.faiss_is_mapped:
            return
        if removed and not _removes_in_place(self._faiss):
            return
        try:
            if removed:
                self._faiss.remove_ids(np.array(removed, dtype=np.int64))
            if len(ids):
                self._faiss.add_with_ids(embeddings, ids)
        except RuntimeError:
            return
        self.faiss_is_stale = False

    def finish_writes(self, progress=None) -> None:
        """After a run's writes (or its interruption): the FAISS file caught up with SQLite."""
        if self.count() or (self.folder / FAISS_FILE).exists():
            self.commit_faiss(progress)

    def commit_faiss(self, progress=None) -> None:
        """Bring the FAISS file in line with SQLite (rebuilding from stored embeddings if needed)."""
        rebuilt = self.faiss_is_stale or self._faiss is None
        if rebuilt:
            self._faiss = self._build_faiss(progress)
            self.faiss_is_stale = False
        content_version = self._meta("content_version")
        if not rebuilt and (self.folder / FAISS_FILE).exists() and self._meta("faiss_version") == content_version:
            return
        # Streamed to a temporary file, synced and renamed: no second copy of the index in memory, and a
        # process that has the old file memory-mapped keeps reading it until it reopens the index.
        index = self._faiss
        atomic_write_with(self.folder / FAISS_FILE, lambda tmp: faiss.write_index(index, tmp))
        with self.db:
            self._set_meta("faiss_version", content_version)

    def _build_faiss(self, progress=None) -> faiss.Index:
        """A new FAISS index from the stored embeddings, streamed from SQLite in batches: besides the index
        itself, only one batch (and, for an untrained factory, its training sample) is in memory."""
        index = new_faiss_index(self.manifest.dimension, self.manifest.faiss_factory)
        total = self.count()
        if not index.is_trained:
            sample = self.training_sample(training_size(index, total))
            try:
                index.train(sample)
            except RuntimeError as error:
                raise CepeRagError(
                    f"cannot train faiss index {self.manifest.faiss_factory!r} on {len(sample)} passages "
                    f"({str(error).splitlines()[-1]}): use a smaller factory or more data"
                ) from None
            del sample
        _set_search_defaults(index)
        for ids, embeddings in self._iter_embeddings(_BUILD_BATCH):
            index.add_with_ids(embeddings, ids)
            if progress:
                progress(len(ids), total)
        return index

    def training_sample(self, size: int, seed: int = 0) -> np.ndarray:
        """`size` stored embeddings drawn uniformly (the same ones for the same index and seed), read by id so that
        only the sampled rows are touched; every embedding when the index holds no more."""
        if size >= self.count():
            return _stack([e for _, e in self._iter_embeddings(_BUILD_BATCH)], self.manifest.dimension)
        low, high = self.db.execute("SELECT MIN(id), MAX(id) FROM passages").fetchone()
        rng = np.random.default_rng(seed)
        chosen: list[np.ndarray] = []
        found, tried = 0, np.zeros(0, dtype=np.int64)
        while found < size:  # ids have holes where documents were replaced: draw more until enough exist
            span = high - low + 1
            draw = min(span, int((size - found) * span / max(self.count(), 1) * 1.1) + 16)
            ids = np.setdiff1d(rng.choice(span, size=draw, replace=False) + low, tried, assume_unique=True)
            if len(ids) == 0:
                break
            tried = np.union1d(tried, ids)
            rows = list(self._rows_by_id("SELECT id, embedding FROM passages", ids.tolist()))[:size - found]
            if rows:
                chosen.append(np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1))
                found += len(rows)
        return _stack(chosen, self.manifest.dimension)

    def _iter_embeddings(self, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        cursor = self.db.execute("SELECT id, embedding FROM passages ORDER BY id")
        while rows := cursor.fetchmany(batch):
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
            yield ids, vectors

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str | None) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value or "0"))

    def _bump_content_version(self) -> None:
        self._set_meta("content_version", str(int(self._meta("content_version") or 0) + 1))

    def close(self) -> None:
        self.db.close()


def _connect(path: Path, *, create: bool) -> sqlite3.Connection:
    if not create and not path.exists():
        raise CepeRagError(f"{path} is missing: the index folder is incomplete")
    try:
        # Shared across threads for reads (async LangChain calls run in an executor); writes stay on one thread.
        new = create and not path.exists()
        db = sqlite3.connect(path, check_same_thread=False)
        if new:  # only an empty database takes a page size, and only before it is in WAL mode
            db.execute(f"PRAGMA page_size={_PAGE_SIZE}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA foreign_keys=ON")
        if create:
            had_lexical = _has_table(db, LEXICAL_TABLE)
            with db:
                db.executescript(_SCHEMA)
                db.executescript(_STATES_SCHEMA)
                db.executescript(_LEXICAL_SCHEMA)
                if not had_lexical:  # an index from before lexical search: index what it holds, once
                    db.execute(f"INSERT INTO {LEXICAL_TABLE}({LEXICAL_TABLE}) VALUES ('rebuild')")
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not {"meta", "documents", "passages"} <= tables:
            raise CepeRagError(f"{path} is not a cepe-rag passage database")
        db.execute("SELECT COUNT(*) FROM passages").fetchone()
    except sqlite3.DatabaseError as error:
        raise CepeRagError(
            f"{path} is corrupt ({error}): restore it or rebuild into another --index folder; it was left untouched"
        ) from None
    return db


def _pack_float16(states: np.ndarray) -> bytes:
    return np.ascontiguousarray(states, dtype=np.float16).tobytes()


def _unpack_float16(blob: bytes, tokens: int, hidden: int) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float16).reshape(tokens, hidden)


def _pack_int8(states: np.ndarray) -> bytes:
    """Symmetric int8 per token row, then the rows' float32 scales."""
    states = np.asarray(states, dtype=np.float32)
    scales = np.abs(states).max(axis=-1) / 127
    scales[scales == 0] = 1.0  # an all-zero row: any scale gives zeros back
    codes = np.clip(np.rint(states / scales[:, None]), -127, 127).astype(np.int8)
    return codes.tobytes() + scales.astype(np.float32).tobytes()


def _unpack_int8(blob: bytes, tokens: int, hidden: int) -> np.ndarray:
    codes = np.frombuffer(blob, dtype=np.int8, count=tokens * hidden).reshape(tokens, hidden)
    scales = np.frombuffer(blob, dtype=np.float32, offset=tokens * hidden, count=tokens)
    return (codes.astype(np.float32) * scales[:, None]).astype(np.float16)


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone() is not None


def query_words(text: str) -> list[str]:
    """The text's distinct words, lower-cased, stopwords left out."""
    return list(dict.fromkeys(w for w in re.findall(r"\w+", text.lower()) if w not in _STOPWORDS))


def lexical_query(text: str) -> str:
    """An FTS5 query matching passages with any of the text's words (quoted: no FTS syntax gets through)."""
    return " OR ".join(f'"{word}"' for word in query_words(text))


def new_faiss_index(dimension: int, factory: str) -> faiss.Index:
    """An empty index for this factory whose ids are passage ids. IVF indexes store ids in their inverted lists
    and remove them in place, so they are used bare; the others are wrapped in an IndexIDMap2, whose id table
    (~50 bytes a vector) an IVF-PQ index of 64-byte codes would otherwise more than double."""
    index = faiss.index_factory(dimension, factory, faiss.METRIC_INNER_PRODUCT)
    if _ivf(index) is None:
        index = faiss.index_factory(dimension, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
    inner = _innermost(index)
    if hasattr(inner, "do_polysemous_training"):
        # The factory turns on polysemous training for PQ codes: minutes of simulated annealing, for a Hamming
        # filter that this store never uses (measured: 184 s of a 221 s IVF64,PQ32 training on 5k vectors).
        inner.do_polysemous_training = False
    return index


def training_size(index: faiss.Index, total: int) -> int:
    """How many stored embeddings an untrained index learns from: at least 100k, and 40 per IVF list."""
    ivf = _ivf(index)
    return min(total, max(_TRAINING_SAMPLE, _TRAINING_PER_LIST * ivf.nlist if ivf is not None else 0))


def read_faiss(path: Path, *, mapped: bool) -> tuple[faiss.Index | None, bool]:
    """(the index, whether it was read with a memory-mapping flag); (None, False) for a corrupt or truncated file.
    `mapped` asks for a memory-mapping where this faiss can make one, falling back to reading it into memory. In
    faiss 1.15 IO_FLAG_MMAP_IFC maps Flat, PQ and SQ codes, HNSW storage and IVF lists alike (measured: a 294 MiB
    Flat or IVF-Flat file opens with 12 MiB resident); IO_FLAG_MMAP maps IVF lists only. A version that accepts a
    flag without mapping still returns a correct index, then flagged as mapped, which only makes it read-only."""
    flags = [getattr(faiss, name) for name in ("IO_FLAG_MMAP_IFC", "IO_FLAG_MMAP") if mapped and hasattr(faiss, name)]
    for flag in [*flags, 0]:
        try:
            return faiss.read_index(str(path), flag), flag != 0
        except RuntimeError:
            continue  # this index type cannot be mapped that way (or the file is corrupt: the last try says)
    return None, False


def _innermost(index: faiss.Index) -> faiss.Index:
    """The index under its id map and transforms (an HNSW index's storage), downcast to its real type."""
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexHNSW):
        index = faiss.downcast_index(index.storage)
    return index


def _compressed(index: faiss.Index) -> bool:
    """Whether the index scores with lossy codes (PQ, SQ, ...) rather than the full vectors."""
    return not isinstance(_innermost(index), (faiss.IndexFlat, faiss.IndexIVFFlat))


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _removes_in_place(index: faiss.Index) -> bool:
    """Whether `remove_ids` keeps the other passages' ids right: an IVF index (ids in its lists), or an IDMap2
    over a Flat one (IDMap2 removal shifts inner ids, which only a Flat index follows); others are rebuilt."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap2):  # (an index written before IVF indexes were used bare is one too)
        return isinstance(faiss.downcast_index(index.index), faiss.IndexFlat)
    return _ivf(index) is not None


def _selecting(index: faiss.Index, allowed: np.ndarray) -> faiss.SearchParameters:
    """Search parameters restricting a search to these ids. An IVF index takes only IVF parameters, which carry
    their own nprobe: the index's is passed on, or the search would probe one list."""
    selector = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
    ivf = _ivf(index)
    if ivf is None:
        return faiss.SearchParameters(sel=selector)
    return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)


def _stack(parts: list[np.ndarray], dimension: int) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty((0, dimension), np.float32)


def _set_search_defaults(index: faiss.Index) -> None:
    """faiss probes one IVF list by default, which misses too much; probe up to 32."""
    ivf = _ivf(index)
    if ivf is not None:
        ivf.nprobe = min(ivf.nlist, 32)


def _on_gpu_if_available(index: faiss.Index) -> faiss.Index:
    """Search on the GPUs when faiss-gpu is installed and sees one; otherwise (or if it fails) on the CPU."""
    if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError:  # not every index type has a GPU version
        return index


def check_factory_syntax(factory: str) -> None:
    """Refuse an unknown FAISS factory before any model loads; the check against the real width comes later.

    20160 = 2^6 * 3^2 * 5 * 7 is divisible by every usual PQ/OPQ sub-quantizer count."""
    _validate_factory(factory, 20160)


def _validate_factory(factory: str, dimension: int) -> None:
    try:
        faiss.index_factory(dimension, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise CepeRagError(f"invalid faiss factory string {factory!r} (examples: Flat, HNSW32, IVF1024,PQ32)") from None


@contextmanager
def writer_lock(folder: str | Path) -> Iterator[None]:
    """One writer per index folder: a second `cepe-rag index` on it stops at once instead of redoing the work.

    An advisory lock on the folder itself (flock on its descriptor), released by the kernel when the process
    ends, however it ends: a kill -9 never leaves a stale lock behind. Readers take no lock."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CepeRagError(f"another `cepe-rag index` is writing to {folder}: wait for it to finish, then run "
                               "this one again (it will add only what is still missing)") from None
        yield
    finally:
        os.close(descriptor)
