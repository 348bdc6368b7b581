"""The SQLite passage database of an index folder: its schema (passages, CEPE states, FTS5 lexical index),
opening it, the packed formats of stored states, and lexical queries."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import numpy as np

from cepe_rag.types import CepeRagError

PAGE_SIZE = 16384  # SQLite page of a new index: a 4 KiB page holds one ~2.2 KB passage row, a 16 KiB one seven

SCHEMA = """
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
STATES_SCHEMA = """
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
LEXICAL_SCHEMA = """
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
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
him his how i if in into is it its itself just me more most my no nor not now of off on once only or other our
out over own same she should so some such than that the their them then there these they this those through to
too under until up very was we were what when where which while who whom why will with would you your
""".split())


def connect(path: Path, *, create: bool) -> sqlite3.Connection:
    if not create and not path.exists():
        raise CepeRagError(f"{path} is missing: the index folder is incomplete")
    try:
        # Shared across threads for reads (async LangChain calls run in an executor); writes stay on one thread.
        new = create and not path.exists()
        db = sqlite3.connect(path, check_same_thread=False)
        if new:  # only an empty database takes a page size, and only before it is in WAL mode
            db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA foreign_keys=ON")
        if create:
            had_lexical = has_table(db, LEXICAL_TABLE)
            with db:
                db.executescript(SCHEMA)
                db.executescript(STATES_SCHEMA)
                db.executescript(LEXICAL_SCHEMA)
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


def pack_float16(states: np.ndarray) -> bytes:
    return np.ascontiguousarray(states, dtype=np.float16).tobytes()


def unpack_float16(blob: bytes, tokens: int, hidden: int) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float16).reshape(tokens, hidden)


def pack_int8(states: np.ndarray) -> bytes:
    """Symmetric int8 per token row, then the rows' float32 scales."""
    states = np.asarray(states, dtype=np.float32)
    scales = np.abs(states).max(axis=-1) / 127
    scales[scales == 0] = 1.0  # an all-zero row: any scale gives zeros back
    codes = np.clip(np.rint(states / scales[:, None]), -127, 127).astype(np.int8)
    return codes.tobytes() + scales.astype(np.float32).tobytes()


def unpack_int8(blob: bytes, tokens: int, hidden: int) -> np.ndarray:
    codes = np.frombuffer(blob, dtype=np.int8, count=tokens * hidden).reshape(tokens, hidden)
    scales = np.frombuffer(blob, dtype=np.float32, offset=tokens * hidden, count=tokens)
    return (codes.astype(np.float32) * scales[:, None]).astype(np.float16)


def has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone() is not None


def query_words(text: str) -> list[str]:
    """The text's distinct words, lower-cased, stopwords left out."""
    return list(dict.fromkeys(w for w in re.findall(r"\w+", text.lower()) if w not in STOPWORDS))


def lexical_query(text: str) -> str:
    """An FTS5 query matching passages with any of the text's words (quoted: no FTS syntax gets through)."""
    return " OR ".join(f'"{word}"' for word in query_words(text))
