"""An index whose passages live in a Qdrant collection (qdrant-client, an optional dependency).

The index folder keeps only its manifest: the embedder, chunking and where the collection is (a server or
cluster's URL, or an embedded store's folder). Each Qdrant point is one passage: its embedding (cosine
distance) and a payload with its text, title, source path and its document's key and content digest.

Writes are incremental by document digest, like the FAISS store, and safe to interrupt: a point's id is
derived from (document key, digest, position), so re-writing a document is idempotent; a document's new
passages are upserted before its old ones are deleted, and every point records how many passages its version
has and when it was written. Opening the store for writing reads the payloads (no vectors) once: the newest
complete version of each document is its indexed one, and the points of any other version (left by an
interrupted run) are deleted, so a re-run leaves neither duplicates nor missing passages.

Searching is dense only (no BM25 here): the CLI answers a hybrid request densely and says so.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import replace
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np

from cepe_rag.indexes.layout import FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, QdrantLocation, check_index_folder
from cepe_rag.indexes.store import Manifest, StoredPassage
from cepe_rag.types import CepeRagError, Passage

_PASSAGE_FIELDS = ["text", "title", "source"]
_CATALOGUE_FIELDS = ["doc_key", "digest", "source", "passages", "written"]
_SETTINGS = ("embedder", "dimension", "chunk_tokens", "overlap_tokens")  # must match between folder and collection
_BATCH = 256  # points per request
_KEYS_PER_FILTER = 1000


def point_id(doc_key: str, digest: str, position: int) -> int:
    """A passage's stable point id: 63 bits of SHA-256 (a collision is ~1e-7 likely among a million passages)."""
    return int.from_bytes(hashlib.sha256(f"{doc_key}\0{digest}\0{position}".encode()).digest()[:8], "big") >> 1


class QdrantStore:
    """The part of `IndexStore` that indexing and retrieval use, over a Qdrant collection."""

    backend = "qdrant"
    has_lexical_index = False
    has_context_states = False
    faiss_is_stale = False

    def __init__(self, folder: Path, manifest: Manifest, client, where: dict):
        self.folder = folder
        self.manifest = manifest
        self.client = client
        self.where = where  # {"url" or "path", "collection"}
        self.collection = where["collection"]
        self._documents: dict[str, tuple[str, str]] | None = None  # key -> (digest, source); read when writing

    # --- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | Path, location: QdrantLocation | None = None) -> QdrantStore:
        """Open a Qdrant index folder for searching; `location` overrides where its manifest says the collection is."""
        folder = Path(folder)
        check_index_folder(folder)
        manifest = Manifest.read(folder)
        if manifest.store != "qdrant":
            raise CepeRagError(f"{folder} is a FAISS index, not a Qdrant one: leave out --store/--qdrant-* options")
        where = _resolve(folder, manifest.qdrant, location)
        return cls(folder, manifest, _connect(where, folder), where)._checked(create=False)

    @classmethod
    def create_or_open(cls, folder: str | Path, manifest: Manifest, location: QdrantLocation | None = None
                       ) -> QdrantStore:
        """Open for writing, creating the folder and the collection; refuses other settings. A new folder may adopt
        an existing collection made by cepe-rag with the same settings (another machine's index of it)."""
        folder = Path(folder)
        if (folder / MANIFEST_FILE).exists():
            existing = Manifest.read(folder)
            if existing.store != "qdrant":
                raise CepeRagError(f"{folder} is a FAISS index: leave out --store qdrant, or choose another --index")
            existing.check_settings(manifest, folder, _SETTINGS)
            where = _resolve(folder, existing.qdrant, location)
            store = cls(folder, existing, _connect(where, folder), where)._checked(create=False)
        elif folder.exists() and any(folder.iterdir()):
            raise CepeRagError(f"{folder} is not empty and is not a cepe-rag index: choose another --index folder")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            where = _resolve(folder, None, location)
            manifest = replace(manifest, faiss_factory="Flat", store="qdrant", qdrant=_portable(folder, where))
            store = cls(folder, manifest, _connect(where, folder), where)._checked(create=True)
            manifest.write(folder)  # last: a folder with a manifest always has its collection
        store._read_catalogue()
        return store

    def _checked(self, *, create: bool) -> QdrantStore:
        """This store, once its collection is known to fit the manifest (created if `create` and missing); closed
        if not (an embedded store stays locked while its client is open)."""
        try:
            self._check_collection(create=create)
        except BaseException:
            self.close()
            raise
        return self

    def _check_collection(self, *, create: bool) -> None:
        name, manifest = self.collection, self.manifest
        if not self._call(self.client.collection_exists, name):
            if not create:
                raise CepeRagError(f"Qdrant collection {name!r} is missing at {_describe(self.where)}: it was "
                                   "deleted, or the URL/path names another Qdrant; re-index into a new --index folder")
            from qdrant_client import models

            self._call(self.client.create_collection, name, metadata={
                "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "content_version": 0,
                **{field: getattr(manifest, field) for field in _SETTINGS}},
                vectors_config=models.VectorParams(size=manifest.dimension, distance=models.Distance.COSINE))
            if self.where.get("url"):  # the payload fields that writes filter on (the embedded mode has no indexes)
                for field, kind in (("doc_key", models.PayloadSchemaType.KEYWORD),
                                    ("written", models.PayloadSchemaType.INTEGER)):
                    self._call(self.client.create_payload_index, name, field, field_schema=kind)
            return
        config = self._call(self.client.get_collection, name).config
        vectors = config.params.vectors
        size = getattr(vectors, "size", None)
        if size != manifest.dimension:
            raise CepeRagError(f"Qdrant collection {name!r} at {_describe(self.where)} holds {size}-d vectors; this "
                               f"index's embedder {manifest.embedder!r} makes {manifest.dimension}-d ones")
        metadata = config.metadata or {}
        if metadata.get("format") != FORMAT_NAME:
            raise CepeRagError(f"Qdrant collection {name!r} at {_describe(self.where)} was not made by cepe-rag: "
                               "choose another --qdrant-collection")
        for field in _SETTINGS:
            if metadata.get(field) != getattr(manifest, field):
                raise CepeRagError(f"Qdrant collection {name!r} was built with {field}={metadata.get(field)!r}, "
                                   f"this index folder says {getattr(manifest, field)!r}")

    def _call(self, method, *args, **kwargs):
        """A Qdrant request; a server that cannot be reached or refuses is one line, not a traceback."""
        from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

        try:
            return method(*args, **kwargs)
        except (ResponseHandlingException, UnexpectedResponse, ConnectionError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CepeRagError(f"Qdrant at {_describe(self.where)}: {reason}") from None

    # --- reading -------------------------------------------------------------------------------

    def count(self) -> int:
        return self._call(self.client.count, self.collection, exact=True).count

    def content_version(self) -> int:
        """Changed by every write (the time it was made), so a cache of search results can tell it is stale."""
        metadata = self._call(self.client.get_collection, self.collection).config.metadata or {}
        return int(metadata.get("content_version", 0))

    def search(self, query_embeddings: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[list[Passage]]:
        """Top-k passages by cosine similarity for each query embedding, best first; only `allowed` ids if given."""
        from qdrant_client import models

        queries = np.asarray(query_embeddings, dtype=np.float32)
        if allowed is not None and len(allowed) == 0:
            return [[] for _ in queries]
        where = None if allowed is None else models.Filter(must=[models.HasIdCondition(has_id=allowed.tolist())])
        requests = [models.QueryRequest(query=query.tolist(), limit=max(1, k), filter=where,
                                        with_payload=_PASSAGE_FIELDS) for query in queries]
        responses = self._call(self.client.query_batch_points, self.collection, requests)
        results = [[_passage(point, float(point.score)) for point in response.points] for response in responses]
        if allowed is None and not any(results) and self.count() == 0:
            raise CepeRagError(f"the index at {self.folder} is empty: add documents with `cepe-rag index`")
        return results

    def check_lexical(self) -> None:
        raise CepeRagError("a Qdrant index has no lexical (BM25) search: use --retrieval dense (or hybrid, which "
                           "searches densely on it)")

    def lexical_search(self, queries: list[str], k: int, allowed: np.ndarray | None = None) -> list[list[Passage]]:
        self.check_lexical()
        return []

    def embeddings(self, ids: list[int]) -> np.ndarray:
        """The stored embeddings of these passages, in the order given (ids must exist)."""
        found = {int(r.id): r.vector for r in self._retrieve(ids, with_payload=False, with_vectors=True)}
        return np.array([found[i] for i in ids], dtype=np.float32).reshape(len(ids), self.manifest.dimension)

    def passages(self, ids: list[int]) -> dict[int, Passage]:
        return {int(r.id): _passage(r) for r in self._retrieve(ids, with_payload=_PASSAGE_FIELDS)}

    def matching_ids(self, source_glob: str | None = None, title_glob: str | None = None) -> np.ndarray:
        """Ids of the passages whose source path and title match these globs (case-sensitive `*`, `?`, `[...]`,
        as SQLite's GLOB for the FAISS store). Reads every passage's source and title once."""
        return np.array([int(r.id) for r in self._scan(["source", "title"])
                         if (not source_glob or fnmatchcase(r.payload["source"], source_glob))
                         and (not title_glob or fnmatchcase(r.payload["title"], title_glob))], dtype=np.int64)

    def passage_texts(self) -> Iterator[str]:
        """Every passage as "title text", for scans over the whole corpus."""
        for record in self._scan(["title", "text"]):
            yield f"{record.payload['title']} {record.payload['text']}"

    def document_digests(self) -> dict[str, str]:
        return {key: digest for key, (digest, _) in self._read_catalogue().items()}

    def document_sources(self) -> list[tuple[str, str]]:
        return [(key, source) for key, (_, source) in self._read_catalogue().items()]

    def context_states_stamp(self) -> str | None:
        return None  # CEPE context states are stored by the FAISS store only

    def context_states_count(self) -> int:
        return 0

    def disk_bytes(self) -> int:
        """Bytes of the embedded store's folder (0 for a server: its disk is not ours to measure)."""
        root = Path(self.where["path"]) if self.where.get("path") else self.folder
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())

    def _retrieve(self, ids: list[int], **what) -> Iterator:
        for start in range(0, len(ids), _KEYS_PER_FILTER):
            yield from self._call(self.client.retrieve, self.collection, ids=[int(i) for i in
                                                                               ids[start:start + _KEYS_PER_FILTER]],
                                  **what)

    def _scan(self, fields: list[str]) -> Iterator:
        """Every point's payload `fields` (no vectors), in pages."""
        offset = None
        while True:
            records, offset = self._call(self.client.scroll, self.collection, limit=4096, offset=offset,
                                         with_payload=fields, with_vectors=False)
            yield from records
            if offset is None:
                return

    # --- writing -------------------------------------------------------------------------------

    def _read_catalogue(self) -> dict[str, tuple[str, str]]:
        """The indexed version of each document, found once; points of any other version are deleted."""
        if self._documents is not None:
            return self._documents
        versions: dict[tuple[str, str], list] = {}  # (key, digest) -> [points, passages, written, source]
        for record in self._scan(_CATALOGUE_FIELDS):
            p = record.payload
            entry = versions.setdefault((p["doc_key"], p["digest"]), [0, p["passages"], 0, p["source"]])
            entry[0] += 1
            entry[2] = max(entry[2], p["written"])
        newest: dict[str, tuple[int, str, str]] = {}  # key -> (written, digest, source) of its newest complete version
        for (key, digest), (points, passages, written, source) in versions.items():
            if points == passages and written > newest.get(key, (-1,))[0]:
                newest[key] = (written, digest, source)
        self._documents = {key: (digest, source) for key, (_, digest, source) in newest.items()}
        stale = [(key, digest) for key, digest in versions if self._documents.get(key, (None,))[0] != digest]
        for key, digest in stale:  # left by an interrupted run: a version being replaced, or half written
            self._delete_points([key], digest=digest)
        if stale:
            self._bump_content_version()
        return self._documents

    def replace_documents(self, documents: Iterable[tuple[str, str, str]], passages: list[StoredPassage],
                          embeddings: np.ndarray, states: list[np.ndarray] | None = None) -> None:
        """Write (key, digest, source) documents with their passages: the new points first, then the documents'
        other points go. Interrupted in between, the next opening for writing finishes the job."""
        if states is not None:
            raise CepeRagError("CEPE context states are stored in FAISS index folders only, not in Qdrant")
        from qdrant_client import models

        documents = list(documents)
        digests = {key: digest for key, digest, _ in documents}
        counts: dict[str, int] = {}
        for passage in passages:
            counts[passage.doc_key] = counts.get(passage.doc_key, 0) + 1
        written = time.time_ns()
        embeddings = np.asarray(embeddings, dtype=np.float32)
        for start in range(0, len(passages), _BATCH):
            chunk = passages[start:start + _BATCH]
            self._call(self.client.upsert, self.collection, wait=True, points=models.Batch(
                ids=[point_id(p.doc_key, digests[p.doc_key], p.position) for p in chunk],
                vectors=embeddings[start:start + len(chunk)].tolist(),
                payloads=[{"doc_key": p.doc_key, "digest": digests[p.doc_key], "position": p.position,
                           "passages": counts[p.doc_key], "written": written, "title": p.title, "text": p.text,
                           "source": p.source} for p in chunk]))
        self._delete_points([key for key, _, _ in documents], keep_written=written)
        self._bump_content_version(written)
        catalogue = self._read_catalogue()
        for key, digest, source in documents:
            catalogue[key] = (digest, source)

    def delete_documents(self, keys: list[str]) -> int:
        """Delete these documents' passages; returns how many there were."""
        from qdrant_client import models

        removed = 0
        for start in range(0, len(keys), _KEYS_PER_FILTER):
            chunk = keys[start:start + _KEYS_PER_FILTER]
            removed += self._call(self.client.count, self.collection, exact=True, count_filter=models.Filter(
                must=[models.FieldCondition(key="doc_key", match=models.MatchAny(any=chunk))])).count
        self._delete_points(keys)
        self._bump_content_version()
        catalogue = self._read_catalogue()
        for key in keys:
            catalogue.pop(key, None)
        return removed

    def _delete_points(self, keys: list[str], *, digest: str | None = None, keep_written: int | None = None) -> None:
        """Delete these documents' points (only those of one `digest`; all but those written at `keep_written`)."""
        from qdrant_client import models

        for start in range(0, len(keys), _KEYS_PER_FILTER):
            chunk = keys[start:start + _KEYS_PER_FILTER]
            must = [models.FieldCondition(key="doc_key", match=models.MatchAny(any=chunk))]
            if digest is not None:
                must.append(models.FieldCondition(key="digest", match=models.MatchValue(value=digest)))
            keep = None if keep_written is None else [
                models.FieldCondition(key="written", match=models.MatchValue(value=keep_written))]
            self._call(self.client.delete, self.collection, wait=True, points_selector=models.FilterSelector(
                filter=models.Filter(must=must, must_not=keep)))

    def _bump_content_version(self, version: int | None = None) -> None:
        self._call(self.client.update_collection, self.collection,
                   metadata={"content_version": version or time.time_ns()})

    def finish_writes(self, progress=None) -> None:
        """Nothing to catch up: every write went to Qdrant as it was made."""

    def close(self) -> None:
        self.client.close()


def _passage(point, score: float = 0.0) -> Passage:
    payload = point.payload
    return Passage(id=int(point.id), text=payload["text"], title=payload["title"], source=payload["source"],
                   score=score)


def _resolve(folder: Path, saved: dict | None, location: QdrantLocation | None) -> dict:
    """Where the collection is: the manifest's record, overridden by `location`'s fields; by default an embedded
    store in `qdrant/` inside the index folder, the collection named after the folder."""
    where = dict(saved or {})
    if location and location.url:
        where.pop("path", None)
        where["url"] = location.url
    if location and location.path:
        where.pop("url", None)
        where["path"] = os.path.abspath(location.path)
    if location and location.collection:
        where["collection"] = location.collection
    if not where.get("url"):
        where["path"] = str(folder / where.get("path", "qdrant"))  # a relative path is relative to the folder
    where.setdefault("collection", re.sub(r"[^A-Za-z0-9_-]", "_", folder.resolve().name) or "cepe_rag")
    return where


def _portable(folder: Path, where: dict) -> dict:
    """`where` as the manifest records it: an embedded store inside the folder by its relative path (the folder
    can move)."""
    if where.get("path"):
        path = Path(os.path.abspath(where["path"]))
        inside = path.is_relative_to(Path(os.path.abspath(folder)))
        return {**where, "path": str(path.relative_to(os.path.abspath(folder))) if inside else str(path)}
    return where


def _describe(where: dict) -> str:
    return where.get("url") or f"the embedded store {where.get('path')}"


def _connect(where: dict, folder: Path):
    """A QdrantClient for `where`; a missing qdrant-client, an unreachable server or an embedded store that another
    process holds is one line."""
    try:
        from qdrant_client import QdrantClient
    except ImportError:
        raise CepeRagError(f"{folder} is a Qdrant index: install qdrant-client (pip install 'cepe-rag[qdrant]')"
                           ) from None
    if where.get("url"):
        # check_compatibility would print a warning for an unreachable server; the first request says it instead.
        return QdrantClient(url=where["url"], api_key=os.environ.get("QDRANT_API_KEY"), timeout=60,
                            check_compatibility=False)
    try:
        client = QdrantClient(path=where["path"])
    except RuntimeError as error:
        if "already accessed" not in str(error):
            raise
        raise CepeRagError(f"the embedded Qdrant store {where['path']} is open in another process (embedded mode "
                           "serves one process at a time; use a Qdrant server for several)") from None
    # Closed at exit if still open: its own __del__ would run during interpreter teardown and print a traceback.
    atexit.register(_close_if_alive, weakref.ref(client))
    return client


def _close_if_alive(reference: weakref.ref) -> None:
    client = reference()
    if client is not None:
        client.close()
