"""`--engine ray` on a local Ray instance: the same index as the single-process path, incremental by content hash,
and a worker killed mid-run loses nothing."""

import logging
import os
import signal
import sqlite3
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from cepe_rag.indexes import IndexStore  # noqa: E402
from cepe_rag.models import load_embedder  # noqa: E402
from cepe_rag.pipelines.indexing import ProgressHooks, build_index  # noqa: E402
from cepe_rag.pipelines.ray_indexing import IndexWorker, RayEngine, check_reachable, connect  # noqa: E402
from cepe_rag.retrieval import Retriever  # noqa: E402
from cepe_rag.types import CepeRagError  # noqa: E402

TOPICS = ["otters", "volcanoes", "the Roman empire", "jazz", "glaciers", "chess", "bees", "lighthouses"]


@pytest.fixture(scope="module")
def local_ray():
    # The workers unpickle this module's helpers (slow embedder, fake state encoder) by value: no import path needed.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    connect()
    yield
    ray.shutdown()


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, topic in enumerate(TOPICS * 2):
        sentences = [f"Fact {j} about {topic}: note number {i * 10 + j} is kept in file {i}." for j in range(1 + i % 4)]
        (folder / f"doc{i:02d}.txt").write_text(" ".join(sentences) * (1 + 6 * (i % 3 == 0)))  # some split
    return folder


def rows(index: Path) -> tuple[list, list, np.ndarray]:
    with sqlite3.connect(index / "passages.sqlite") as db:
        documents = db.execute("SELECT key, digest, source FROM documents ORDER BY key").fetchall()
        passages = db.execute("SELECT id, doc_key, position, title, text, source FROM passages ORDER BY id").fetchall()
        vectors = [np.frombuffer(blob, dtype=np.float32) for (blob,) in
                   db.execute("SELECT embedding FROM passages ORDER BY id")]
    return documents, passages, np.stack(vectors)


def assert_same_index(index: Path, reference: Path, embedder, *, same_ids: bool = True) -> None:
    """Same documents, passages and embeddings; with `same_ids` (the same commits) the same ids and top-k too."""
    documents, passages, vectors = rows(index)
    ref_documents, ref_passages, ref_vectors = rows(reference)
    assert documents == ref_documents
    by_position = {p[1:3]: (p[3:], v) for p, v in zip(passages, vectors)}
    ref_by_position = {p[1:3]: (p[3:], v) for p, v in zip(ref_passages, ref_vectors)}
    assert len(by_position) == len(passages)  # no passage twice
    assert by_position.keys() == ref_by_position.keys()  # none missing
    for key, (fields, vector) in by_position.items():
        assert fields == ref_by_position[key][0]
        np.testing.assert_allclose(vector, ref_by_position[key][1], atol=1e-5)
    if same_ids:
        assert passages == ref_passages
        ours, theirs = Retriever(index, embedder=embedder), Retriever(reference, embedder=embedder)
        for topic in TOPICS:
            question = f"a fact about {topic}"
            assert [p.id for p in ours.retrieve(question, k=5)] == [p.id for p in theirs.retrieve(question, k=5)]


class FakeStateEncoder:
    """Deterministic stand-in for a CEPE encoder: a passage's 'states' follow from its text."""

    stamp = "fake-encoder"
    state_format = "float16"

    def encode(self, passages):
        return [np.full((1 + len(p.text) % 5, 4), len(p.text), dtype=np.float16) for p in passages]


def test_a_worker_batch_whose_states_all_have_one_shape(embedder):
    # numpy would read a list of equal-shaped arrays as one 3-D array, which an object column cannot take whole.
    worker = IndexWorker(lambda: embedder, FakeStateEncoder, chunk_tokens=64, overlap_tokens=0)
    out = worker({"row": np.array([0, 1]), "title": np.array(["A", "B"], dtype=object),
                  "text": np.array(["Same length.", "Also length."], dtype=object)})
    assert [s.shape for s in out["states"]] == [(3, 4), (3, 4)] and out["embedding"].shape[0] == 2


def test_same_index_top_k_and_states_as_the_single_process_path(local_ray, embedder, corpus, tmp_path):
    local = build_index([corpus], tmp_path / "local", embedder=embedder, batch_passages=5,
                        state_encoder=FakeStateEncoder())
    # Two windows and small actor batches: the commits still hold the same whole documents.
    half = sum(len(f.read_text()) for f in corpus.iterdir()) // 2
    engine = RayEngine(workers=2, batch_documents=3, window_chars=half, state_encoder_factory=FakeStateEncoder)
    distributed = build_index([corpus], tmp_path / "ray", embedder=embedder, batch_passages=5,
                              state_encoder=FakeStateEncoder(), engine=engine)
    assert (distributed.documents_embedded, distributed.passages_added) == (16, local.passages_added)
    assert local.passages_added > 16  # some documents were split
    assert distributed.states_added == distributed.passages_added
    assert_same_index(tmp_path / "ray", tmp_path / "local", embedder)
    ours, theirs = IndexStore.open(tmp_path / "ray"), IndexStore.open(tmp_path / "local")
    ids = list(range(1, theirs.count() + 1))
    assert ours.context_states_stamp() == "fake-encoder"
    states, reference = ours.context_states(ids, 4), theirs.context_states(ids, 4)
    assert states.keys() == reference.keys() == set(ids)
    assert all(np.array_equal(states[i], reference[i]) for i in ids)


def test_incremental_by_content_hash(local_ray, embedder, corpus, tmp_path):
    index = tmp_path / "idx"
    build_index([corpus], index, embedder=embedder)  # the two engines write the same index: either goes on
    engine = RayEngine(workers=1, batch_documents=4)
    again = build_index([corpus], index, embedder=embedder, engine=engine)
    assert (again.documents_embedded, again.documents_unchanged, again.passages_added) == (0, 16, 0)

    (corpus / "doc01.txt").write_text("River otters live in burrows near water.")
    (corpus / "doc02.txt").unlink()
    (corpus / "new.txt").write_text("The Nile is a river in Africa.")
    changed = build_index([corpus], index, embedder=embedder, engine=engine)
    assert (changed.documents_embedded, changed.documents_unchanged, changed.documents_deleted) == (2, 14, 1)
    build_index([corpus], tmp_path / "local", embedder=embedder)
    assert_same_index(index, tmp_path / "local", embedder, same_ids=False)


class SlowEmbedder:
    """The real embedder, slowed down, that leaves its process id where the test can find it."""

    def __init__(self, pid_folder: str):
        self.inner = load_embedder()
        self.tokenizer = self.inner.tokenizer
        (Path(pid_folder) / str(os.getpid())).touch()

    def get_embedding_dimension(self):
        return self.inner.get_embedding_dimension()

    def encode(self, texts, **kwargs):
        import time

        time.sleep(0.3)
        return self.inner.encode(texts, **kwargs)


def test_a_worker_killed_mid_run_loses_nothing(local_ray, embedder, corpus, tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    killed = []

    class KillAfterFirstCommit(ProgressHooks):
        def passages(self, n):
            if not killed:
                victim = int(next(pids.iterdir()).name)
                os.kill(victim, signal.SIGKILL)  # the only embedding actor, with batches still to do
                killed.append(victim)

    engine = RayEngine(workers=1, batch_documents=2, embedder_factory=partial(SlowEmbedder, str(pids)))
    index = tmp_path / "ray"
    try:  # Ray restarts the actor and retries its batches; if it gives up, the run stops with one line
        build_index([corpus], index, embedder=embedder, batch_passages=2, engine=engine, hooks=KillAfterFirstCommit())
    except CepeRagError as error:
        assert "run the same command again" in str(error)
    assert killed
    rerun = build_index([corpus], index, embedder=embedder, engine=RayEngine(workers=2))
    assert rerun.documents_embedded + rerun.documents_unchanged == 16
    build_index([corpus], tmp_path / "local", embedder=embedder, batch_passages=2)
    assert_same_index(index, tmp_path / "local", embedder, same_ids=rerun.documents_embedded == 0)


def test_ray_missing_or_unreachable_is_a_one_line_error(monkeypatch):
    with pytest.raises(CepeRagError, match="cannot reach Ray at 127.0.0.1:1"):
        check_reachable("127.0.0.1:1")
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(CepeRagError, match=r"pip install 'cepe-rag\[ray\]'"):
        connect()
