"""An index folder: FAISS vectors + SQLite passages + a JSON manifest. No pickle anywhere.

SQLite is the source of truth: it holds every passage with its embedding, and each document with its
passages is committed in one transaction. Lexical (BM25) search is SQLite's FTS5 over the same rows, kept
up to date by triggers inside those transactions, so it is incremental and as kill -9 safe as the passages.
The FAISS file is derived from SQLite and stamped with the content version it was built from; a stale or
missing FAISS file is rebuilt from SQLite without re-embedding anything.
So a run killed at any moment leaves a usable index, and the next run resumes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import numpy as np

from cepe_rag.files import atomic_write_with
from cepe_rag.indexes import faiss_file, passage_db
from cepe_rag.indexes.layout import DB_FILE, FAISS_FILE, MANIFEST_FILE, check_index_folder
from cepe_rag.indexes.manifest import Manifest, writer_lock
from cepe_rag.indexes.passage_db import LEXICAL_TABLE, STATES_FORMAT_KEY, STATES_STAMP_KEY, STATES_TABLE
from cepe_rag.settings import CONTEXT_STATE_FORMATS, check_choice
from cepe_rag.types import CepeRagError, Passage

__all__ = ["IndexStore", "Manifest", "StoredDocument", "StoredPassage", "writer_lock"]

_RERANK = 4  # a compressed index (PQ, SQ) proposes this many times k passages, re-scored on the stored embeddings
_BUILD_BATCH = 8192  # embeddings read from SQLite and added to FAISS at a time


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
        self.has_lexical_index = passage_db.has_table(db, LEXICAL_TABLE)
        self.has_context_states = passage_db.has_table(db, STATES_TABLE)  # the table: an older index has none

    # --- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | Path) -> IndexStore:
        """Open an existing index for reading; every problem is a one-line CepeRagError."""
        folder = Path(folder)
        check_index_folder(folder)
        manifest = Manifest.read(folder).check_faiss(folder)
        store = cls(folder, manifest, passage_db.connect(folder / DB_FILE, create=False))
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
            faiss_file.validate_factory(manifest.faiss_factory, manifest.dimension)
            manifest.write(folder)
        store = cls(folder, manifest, passage_db.connect(folder / DB_FILE, create=True))
        store._load_faiss(required=False)
        if store._faiss is None and store.count() == 0:
            # Untrained factories (IVF, PQ) are built and trained at the end, from a sample of the data.
            store._faiss = faiss_file.new_faiss_index(manifest.dimension, manifest.faiss_factory)
        return store

    @classmethod
    def open_catalog(cls, folder: str | Path) -> IndexStore:
        """Open an existing index to list and read its documents: SQLite only, so it takes the same few
        milliseconds on any size of index. `search` is not available on it; `faiss_is_stale` is read from the
        metadata (the FAISS file is not loaded, so a corrupt one is not noticed here)."""
        folder = Path(folder)
        check_index_folder(folder)
        manifest = Manifest.read(folder).check_faiss(folder)
        store = cls(folder, manifest, passage_db.connect(folder / DB_FILE, create=False))
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
            index, self.faiss_is_mapped = faiss_file.read_faiss(path, mapped=required)
        if index is None:
            self.faiss_is_stale = self.count() > 0
        elif index.d != self.manifest.dimension:
            raise CepeRagError(f"{path} holds {index.d}-d vectors, the manifest says {self.manifest.dimension}")
        if required and self.faiss_is_stale:
            index, self.faiss_is_mapped = self._build_faiss(), False
        if index is None:
            return
        faiss_file.set_search_defaults(index)
        self._faiss = faiss_file.on_gpu_if_available(index) if required else index

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
        compressed = faiss_file.compressed(self._faiss)
        candidates = min(k * _RERANK, self._faiss.ntotal) if compressed else k
        if allowed is None:
            scores, ids = self._faiss.search(queries, candidates)
        elif len(allowed) == 0:
            return [[] for _ in queries]
        else:
            try:  # exact filtering inside FAISS (Flat, IVF, HNSW on the CPU)
                scores, ids = self._faiss.search(queries, candidates, params=faiss_file.selecting(self._faiss, allowed))
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
            match = passage_db.lexical_query(query)
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
        return [w for w in passage_db.query_words(text) if self.db.execute(
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
        unpack = passage_db.unpack_int8 if self.context_states_format() == "int8" else passage_db.unpack_float16
        return {pid: unpack(blob, tokens, hidden_size) for pid, tokens, blob in rows}

    def _insert_states(self, ids: list[int], states: list[np.ndarray]) -> None:
        pack = passage_db.pack_int8 if self.context_states_format() == "int8" else passage_db.pack_float16
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
        if removed and not faiss_file.removes_in_place(self._faiss):
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
        index = faiss_file.new_faiss_index(self.manifest.dimension, self.manifest.faiss_factory)
        total = self.count()
        if not index.is_trained:
            sample = self.training_sample(faiss_file.training_size(index, total))
            try:
                index.train(sample)
            except RuntimeError as error:
                raise CepeRagError(
                    f"cannot train faiss index {self.manifest.faiss_factory!r} on {len(sample)} passages "
                    f"({str(error).splitlines()[-1]}): use a smaller factory or more data"
                ) from None
            del sample
        faiss_file.set_search_defaults(index)
        for ids, embeddings in self._iter_embeddings(_BUILD_BATCH):
            index.add_with_ids(embeddings, ids)
            if progress:
                progress(len(ids), total)
        return index

    def training_sample(self, size: int, seed: int = 0) -> np.ndarray:
        """`size` stored embeddings drawn uniformly (the same ones for the same index and seed), read by id so that
        only the sampled rows are touched; every embedding when the index holds no more."""
        if size >= self.count():
            return faiss_file.stack([e for _, e in self._iter_embeddings(_BUILD_BATCH)], self.manifest.dimension)
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
        return faiss_file.stack(chosen, self.manifest.dimension)

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
