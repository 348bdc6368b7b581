"""Indexes larger than memory: FAISS built from SQLite in batches, written without an in-memory copy, searched
memory-mapped; the RAM/disk estimate that refuses a run that will not fit."""

import json

import faiss
import numpy as np
import pytest

from cepe_rag.indexes import faiss_file, sizing
from cepe_rag.indexes import store as store_module
from cepe_rag.indexes.faiss_file import read_faiss
from cepe_rag.indexes.store import IndexStore, Manifest, StoredPassage
from cepe_rag.pipelines.indexing import build_index
from cepe_rag.types import CepeRagError

DIMENSION = 16


def vectors(count: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((count, DIMENSION)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fill(folder, factory: str, count: int = 3000, documents: int = 30) -> IndexStore:
    """An index of `documents` documents holding `count` random passages, without any embedder."""
    store = IndexStore.create_or_open(folder, Manifest(embedder="test", dimension=DIMENSION, faiss_factory=factory))
    x = vectors(count, 0)
    per = count // documents
    for d in range(documents):
        key = f"doc{d}"
        store.replace_documents([(key, f"digest{d}", f"/corpus/{key}.txt")],
                                [StoredPassage(key, i, f"title {d}", f"passage {d}.{i}", f"/corpus/{key}.txt")
                                 for i in range(per)], x[d * per:(d + 1) * per])
    return store


def test_ivf_pq_is_trained_on_a_sample_and_filled_from_sqlite_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "_BUILD_BATCH", 256)
    monkeypatch.setattr(faiss_file, "TRAINING_SAMPLE", 1000)
    monkeypatch.setattr(faiss, "serialize_index", None)  # the file is streamed by write_index, never serialized
    store = fill(tmp_path / "idx", "IVF16,PQ4")
    assert store.faiss_is_stale  # untrained during the run: nothing held in memory, built at the end
    added, trained = [], []
    real_iter, real_sample = IndexStore._iter_embeddings, IndexStore.training_sample

    def spying_iter(self, batch):
        for ids, x in real_iter(self, batch):
            added.append(len(ids))
            yield ids, x

    def spying_sample(self, size, seed=0):
        trained.append(real_sample(self, size, seed))
        return trained[-1]

    monkeypatch.setattr(IndexStore, "_iter_embeddings", spying_iter)
    monkeypatch.setattr(IndexStore, "training_sample", spying_sample)
    store.commit_faiss()
    assert max(added) <= 256 and sum(added) == 3000
    assert len(trained) == 1 and len(trained[0]) == 1000  # max(1000, 40 × 16 lists) of the 3000
    stored = store.embeddings(list(range(1, 3001)))
    assert len({row.tobytes() for row in trained[0]}) == 1000  # distinct stored embeddings
    assert {row.tobytes() for row in trained[0]} <= {row.tobytes() for row in stored}
    assert np.array_equal(store.training_sample(1000), trained[0])  # the same sample for the same index
    index = faiss.downcast_index(store._faiss)
    assert isinstance(index, faiss.IndexIVFPQ) and not index.do_polysemous_training  # bare IVF: ids in its lists
    store.close()


def test_memory_mapped_index_gives_the_same_results_as_one_read_into_memory(tmp_path):
    fill(tmp_path / "idx", "IVF16,PQ4").commit_faiss()
    store = IndexStore.open(tmp_path / "idx")
    assert store.faiss_is_mapped and not store.faiss_is_stale
    queries = vectors(20, 1)
    in_memory, mapped = read_faiss(tmp_path / "idx" / "index.faiss", mapped=False)
    assert not mapped
    faiss.extract_index_ivf(in_memory).nprobe = faiss.extract_index_ivf(store._faiss).nprobe
    assert np.array_equal(store._faiss.search(queries, 10)[1], in_memory.search(queries, 10)[1])
    from_mapped = store.search(queries, 10)
    store._faiss = in_memory
    assert [[p.id for p in row] for row in store.search(queries, 10)] == [[p.id for p in row] for row in from_mapped]
    store.close()


@pytest.mark.parametrize("factory", ["Flat", "HNSW16"])
def test_flat_and_hnsw_are_mapped_too(tmp_path, factory):
    fill(tmp_path / "idx", factory, count=300, documents=3).commit_faiss()
    store = IndexStore.open(tmp_path / "idx")
    assert store.faiss_is_mapped
    assert store.search(vectors(1, 0)[:1], 1)[0][0].id == 1  # the first stored vector finds itself
    store.close()


def test_compressed_index_is_rescored_exactly_and_filters_work_on_ivf(tmp_path):
    store = fill(tmp_path / "idx", "IVF16,PQ4")
    store.commit_faiss()
    store.close()
    store = IndexStore.open(tmp_path / "idx")
    queries = vectors(5, 2)
    for row, query in zip(store.search(queries, 10), queries):
        exact = store.embeddings([p.id for p in row]) @ query
        assert np.allclose([p.score for p in row], exact, atol=1e-5)  # exact scores, best first
        assert list(exact) == sorted(exact, reverse=True)
    allowed = store.matching_ids(source_glob="*/doc3.txt")  # a filter on an IVF index needs IVF parameters
    found = store.search(queries, 5, allowed=allowed)
    assert all(row and {p.source for p in row} == {"/corpus/doc3.txt"} for row in found)
    store.close()


def test_ivf_removes_in_place_without_a_rebuild(tmp_path):
    store = fill(tmp_path / "idx", "IVF16,Flat")
    store.commit_faiss()
    removed_ids = [int(i) for i in store.matching_ids(source_glob="*/doc0.txt")]
    assert store.delete_documents(["doc0"]) == 100
    assert not store.faiss_is_stale  # no retraining: removed from the lists
    x = vectors(3000, 0)
    hits = store.search(x[:100], 1)  # doc0's own vectors no longer find themselves
    assert all(row[0].id not in removed_ids for row in hits)
    assert [row[0].id for row in store.search(x[100:110], 1)] == list(range(101, 111))
    store.close()


def test_faiss_write_is_atomic(tmp_path, monkeypatch):
    store = fill(tmp_path / "idx", "Flat", count=300, documents=3)
    store.commit_faiss()
    path = tmp_path / "idx" / "index.faiss"
    before = path.read_bytes()
    store.delete_documents(["doc1"])

    def interrupted(index, filename):
        with open(filename, "wb") as handle:
            handle.write(b"half an index")
        raise RuntimeError("disk full")

    monkeypatch.setattr(faiss, "write_index", interrupted)
    with pytest.raises(RuntimeError, match="disk full"):
        store.commit_faiss()
    assert path.read_bytes() == before  # the old file, whole
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []  # no temporary left
    monkeypatch.undo()
    store.commit_faiss()
    assert faiss.read_index(str(path)).ntotal == 200 and (path.stat().st_mode & 0o777) != 0o600
    store.close()
    assert IndexStore.open(tmp_path / "idx").faiss_is_stale is False


def test_estimate_per_factory():
    gib = 2**30
    wiki = dict(corpus_bytes=13 * gib, documents=21_000_000, dimension=384, chunk_tokens=256, overlap_tokens=32,
                context_states=False)
    flat = sizing.estimate(factory="Flat", **wiki)
    ivfpq = sizing.estimate(factory="IVF65536,PQ64", **wiki)
    assert flat.passages == ivfpq.passages == 21_000_000
    assert 30 * gib < flat.faiss_bytes < 34 * gib  # 384 × 4 bytes + the id map, a vector
    assert ivfpq.faiss_bytes < 2 * gib and ivfpq.training_bytes == 3 * 40 * 65536 * 384 * 4
    assert flat.ram_bytes > flat.faiss_bytes > ivfpq.ram_bytes
    states = sizing.estimate(factory="Flat", **{**wiki, "context_states": True})
    assert states.states_bytes > 500 * flat.sqlite_bytes / 100


def test_jsonl_lines_are_estimated_from_the_first_mib(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with (corpus / "wiki.jsonl").open("w") as handle:
        for i in range(20_000):
            handle.write(json.dumps({"id": str(i), "contents": f"Title {i}\n" + "word " * 40}) + "\n")
    (corpus / "notes.md").write_text("# notes\n\nsome text")
    (corpus / "image.png").write_bytes(b"\x89PNG" * 100)  # not a document
    size, documents = sizing.corpus_stats([corpus])
    assert size == (corpus / "wiki.jsonl").stat().st_size + (corpus / "notes.md").stat().st_size
    assert 19_500 < documents < 20_500


def test_a_run_that_does_not_fit_is_refused_before_anything_is_written(embedder, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("A short document about the moon. " * 200)
    monkeypatch.setattr(sizing, "available_memory", lambda: 100 * 2**20)
    with pytest.raises(CepeRagError, match=r"needs ~1\.\d GiB of RAM .* 0\.1 GiB is available.*--force"):
        build_index([corpus], tmp_path / "idx", embedder=embedder)
    assert not (tmp_path / "idx" / "manifest.json").exists()
    monkeypatch.setattr(sizing, "available_memory", lambda: 64 * 2**30)
    monkeypatch.setattr(sizing, "free_disk", lambda folder: 2**10)
    with pytest.raises(CepeRagError, match=r"GiB of disk .* has 0\.0 GiB free: use --index on another disk"):
        build_index([corpus], tmp_path / "idx", embedder=embedder)
    summary = build_index([corpus], tmp_path / "idx", embedder=embedder, check_size=False)  # --force
    assert summary.passages_total > 0


def test_the_refusal_advises_ivf_pq_when_flat_is_what_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(sizing, "corpus_stats", lambda sources: (13 * 2**30, 21_000_000))
    monkeypatch.setattr(sizing, "available_memory", lambda: 16 * 2**30)
    monkeypatch.setattr(sizing, "free_disk", lambda folder: 2**50)
    with pytest.raises(CepeRagError, match=r"~21,000,000 passages .*FAISS Flat 3\d\.\d GiB.*--faiss IVF65536,PQ64"):
        sizing.check_fits(["wiki"], tmp_path / "idx", factory="Flat", dimension=384, chunk_tokens=256,
                          overlap_tokens=32, context_states=False)
    found = sizing.check_fits(["wiki"], tmp_path / "idx", factory="IVF65536,PQ64", dimension=384, chunk_tokens=256,
                              overlap_tokens=32, context_states=False)
    assert found.ram_bytes < 16 * 2**30
