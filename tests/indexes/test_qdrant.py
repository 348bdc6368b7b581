"""The Qdrant store, in Qdrant's embedded mode: the same answers as FAISS Flat, incremental and interruptible
writes, filters, and one-line errors."""

import json
import sys

import numpy as np
import pytest

pytest.importorskip("qdrant_client")

from qdrant_client import QdrantClient, models  # noqa: E402

from cepe_rag.documents.splitting import PassageSplitter  # noqa: E402
from cepe_rag.indexes import IndexStore, QdrantStore, open_store  # noqa: E402
from cepe_rag.indexes import qdrant as qdrant_module  # noqa: E402
from cepe_rag.indexes.layout import QdrantLocation, check_store_options  # noqa: E402
from cepe_rag.pipelines.indexing import build_index, copy_index  # noqa: E402
from cepe_rag.retrieval import Abstention, PassageFilter, Retriever  # noqa: E402
from cepe_rag.types import CepeRagError  # noqa: E402
from tests.pipelines.test_indexing import FACTS, corpus  # noqa: E402, F401 -- the fixture

QUESTIONS = ["Who directed 2001: A Space Odyssey?", "tall mountains", "animals using tools", "Paris landmarks",
             "rivers of Africa", "a film from 1968"]
OTTERS = "\n\n".join(f"Sea otters, fact {i}: they float on their backs while sleeping." for i in range(6))


def in_qdrant(embedder, sources, folder, **kwargs):
    return build_index([str(s) for s in sources], folder, embedder=embedder, qdrant=QdrantLocation(), **kwargs)


def everything(index) -> list[tuple[str, str]]:
    """(source, text) of every stored passage, duplicates kept (the embedded store closed again: one client at a
    time may open it)."""
    store = QdrantStore.open(index)
    try:
        return sorted((r.payload["source"], r.payload["text"]) for r in store._scan(["source", "text"]))
    finally:
        store.close()


@pytest.fixture
def wider(corpus):  # noqa: F811
    """The four facts and twenty near-duplicates: rankings with close scores."""
    for i in range(20):
        (corpus / f"note{i:02d}.txt").write_text(f"Note {i}: {list(FACTS.values())[i % 4]} Also item {i * 7}.")
    return corpus


def test_same_top_k_as_faiss_flat_on_the_same_embeddings(embedder, wider, tmp_path):
    build_index([str(wider)], tmp_path / "faiss", embedder=embedder)
    in_qdrant(embedder, [wider], tmp_path / "qdrant")
    faiss_retriever = Retriever(tmp_path / "faiss", embedder=embedder, mode="dense")
    qdrant_retriever = Retriever(tmp_path / "qdrant", embedder=embedder, mode="dense")
    assert isinstance(qdrant_retriever.store, QdrantStore) and qdrant_retriever.store.count() == 24
    for expected, found in zip(faiss_retriever.retrieve_batch(QUESTIONS, 10),
                               qdrant_retriever.retrieve_batch(QUESTIONS, 10)):
        assert [p.text for p in found] == [p.text for p in expected]
        assert [(p.title, p.source) for p in found] == [(p.title, p.source) for p in expected]
        assert np.allclose([p.score for p in found], [p.score for p in expected], atol=1e-5)
        assert np.allclose(qdrant_retriever.store.embeddings([p.id for p in found]),
                           faiss_retriever.store.embeddings([p.id for p in expected]), atol=1e-6)
        assert qdrant_retriever.store.passages([found[0].id])[found[0].id].text == found[0].text
    qdrant_retriever.store.close()

    copy_index(tmp_path / "faiss", tmp_path / "copy", qdrant=QdrantLocation())  # the embeddings, not re-embedded
    copied = Retriever(tmp_path / "copy", embedder=embedder, mode="dense")
    assert [[p.id for p in r] for r in copied.retrieve_batch(QUESTIONS, 10)] == [
        [p.id for p in r] for r in Retriever(tmp_path / "qdrant", embedder=embedder, mode="dense").retrieve_batch(
            QUESTIONS, 10)]  # the same point ids: derived from (document, digest, position)


def test_incremental_rerun_adds_nothing_and_follows_changes(embedder, corpus, tmp_path):  # noqa: F811
    index = tmp_path / "idx"
    first = in_qdrant(embedder, [corpus], index)
    assert (first.documents_embedded, first.passages_total) == (4, 4)
    again = build_index([str(corpus)], index, embedder=embedder)  # the folder says where: no option needed
    assert (again.documents_embedded, again.documents_unchanged, again.passages_added) == (0, 4, 0)

    (corpus / "otters.md").write_text("River otters live in burrows near water.")
    (corpus / "everest.txt").unlink()
    (corpus / "new.txt").write_text("The Nile is a river in Africa.")
    changed = build_index([str(corpus)], index, embedder=embedder)
    assert (changed.documents_embedded, changed.documents_unchanged, changed.documents_deleted) == (2, 2, 1)
    assert (changed.passages_deleted, changed.passages_total) == (1, 4)
    texts = [text for _, text in everything(index)]
    assert "River otters live in burrows near water." in texts and "The Nile is a river in Africa." in texts
    assert FACTS["otters.md"] not in texts and FACTS["everest.txt"] not in texts and len(texts) == 4


def test_source_and_title_filters(embedder, wider, tmp_path):
    in_qdrant(embedder, [wider], tmp_path / "idx")
    only_notes = Retriever(tmp_path / "idx", embedder=embedder, filters=PassageFilter(source="*/note1?.txt"))
    found = only_notes.retrieve("Who directed 2001: A Space Odyssey?", 20)
    assert len(found) == 10 and all("/note1" in p.source for p in found)
    assert "Kubrick" in found[0].text
    only_notes.store.close()
    titled = Retriever(tmp_path / "idx", embedder=embedder, filters=PassageFilter(source="*.txt", title="kubrick"))
    assert [p.title for p in titled.retrieve("mountains", 5)] == ["kubrick"]
    assert len(titled.store.matching_ids(title_glob="no such title")) == 0
    assert titled.store.search(np.ones((1, 384), np.float32), 3, np.array([], np.int64)) == [[]]


def test_an_interrupted_run_then_a_rerun_leaves_no_duplicates_or_missing_passages(
        embedder, corpus, tmp_path, monkeypatch):  # noqa: F811
    kwargs = {"chunk_tokens": 16, "overlap_tokens": 2}
    in_qdrant(embedder, [corpus], tmp_path / "idx", **kwargs)

    def run(**more):
        return build_index([str(corpus)], tmp_path / "idx", embedder=embedder, **kwargs, **more)

    splitter = PassageSplitter(embedder.tokenizer, **kwargs)

    def should_hold() -> list[tuple[str, str]]:
        return sorted((str(path), text) for path in corpus.iterdir() for text in splitter.split(path.read_text()))

    before = should_hold()
    (corpus / "otters.md").write_text(OTTERS)
    expected = should_hold()
    assert len(splitter.split(OTTERS)) >= 5

    # 1. Killed half-way through writing the new version of a document: some of its points are written.
    monkeypatch.setattr(qdrant_module, "_BATCH", 2)
    real_upsert, calls = QdrantClient.upsert, []

    def failing_upsert(self, *args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real_upsert(self, *args, **kw)

    monkeypatch.setattr(QdrantClient, "upsert", failing_upsert)
    with pytest.raises(RuntimeError, match="killed"):
        run()
    monkeypatch.setattr(QdrantClient, "upsert", real_upsert)
    half = everything(tmp_path / "idx")
    assert FACTS["otters.md"] in [text for _, text in half] and len(half) == len(before) + 4  # + 4 new points
    rerun = run()
    assert rerun.documents_embedded == 1 and rerun.passages_total == len(expected)
    assert everything(tmp_path / "idx") == expected

    # 2. Killed after the new version was written, before the old one was deleted: both are complete.
    (corpus / "otters.md").write_text(FACTS["otters.md"])
    monkeypatch.setattr(QdrantStore, "_delete_points", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("kill")))
    with pytest.raises(RuntimeError, match="kill"):
        run()
    monkeypatch.undo()
    assert len(everything(tmp_path / "idx")) == len(expected) + 1  # both versions, for now
    rerun = run()
    assert rerun.documents_embedded == 0 and rerun.documents_unchanged == 4  # the newer version is complete
    assert everything(tmp_path / "idx") == before

    # 3. Ctrl-C between batches: committed documents stay, the next run adds the rest.
    for i in range(3):
        (corpus / f"extra{i}.txt").write_text(f"Extra fact number {i}.")
    real_replace = QdrantStore.replace_documents

    def interrupted(self, documents, *args, **kw):
        real_replace(self, documents, *args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(QdrantStore, "replace_documents", interrupted)
    stopped = run(batch_passages=1)
    monkeypatch.undo()
    assert stopped.interrupted and stopped.documents_embedded == 0 and stopped.passages_total == len(before) + 1
    resumed = run(batch_passages=1)
    assert (resumed.documents_embedded, resumed.documents_unchanged) == (2, 5)
    assert everything(tmp_path / "idx") == should_hold() and len(should_hold()) == len(before) + 3


def test_hybrid_answers_densely_and_abstention_keeps_its_floor(embedder, corpus, tmp_path):  # noqa: F811
    in_qdrant(embedder, [corpus], tmp_path / "idx")
    retriever = Retriever(tmp_path / "idx", embedder=embedder)  # hybrid, the default
    assert retriever.lexical_missing and retriever.mode == "dense"
    assert retriever.unknown_words("Who calibrated the Zorblax gauge?") == []
    passages = retriever.retrieve("Who calibrated the Zorblax gauge?", 2)
    assert all(p.dense_score is not None and p.lexical_score is None for p in passages)
    unknown = retriever.unknown_words("Who calibrated the Zorblax gauge?")  # no lexical index: none known unknown
    assert "below 0.34" in Abstention().reason(passages, unknown)
    with pytest.raises(CepeRagError, match="no lexical"):
        Retriever(retriever.store, mode="lexical")


def test_bad_inputs_are_one_line_errors(embedder, corpus, tmp_path, monkeypatch):  # noqa: F811
    with pytest.raises(CepeRagError, match="not both"):
        QdrantLocation(url="http://localhost:6333", path="x")
    with pytest.raises(CepeRagError, match="Qdrant at http://127.0.0.1:9"):  # nothing listens on port 9
        build_index([str(corpus)], tmp_path / "unreachable", embedder=embedder,
                    qdrant=QdrantLocation(url="http://127.0.0.1:9"))
    assert not (tmp_path / "unreachable" / "manifest.json").exists()

    index = tmp_path / "idx"
    in_qdrant(embedder, [corpus], index)
    with pytest.raises(CepeRagError, match="collection 'nope' is missing"):
        open_store(index, QdrantLocation(collection="nope"))
    with pytest.raises(CepeRagError, match="keeps its passages in Qdrant"):
        IndexStore.open_catalog(index)  # `cepe-rag docs`
    with pytest.raises(CepeRagError, match="is a qdrant index, not a faiss one"):
        check_store_options(index, "faiss")
    with pytest.raises(CepeRagError, match="chunk_tokens"):
        build_index([str(corpus)], index, embedder=embedder, chunk_tokens=64)
    with pytest.raises(CepeRagError, match="context states"):
        build_index([str(corpus)], index, embedder=embedder, state_encoder=object())
    first = QdrantStore.open(index)
    with pytest.raises(CepeRagError, match="open in another process"):
        QdrantStore.open(index)
    first.close()
    monkeypatch.setitem(sys.modules, "qdrant_client", None)  # as where qdrant-client is not installed
    with pytest.raises(CepeRagError, match="install qdrant-client"):
        open_store(index)
    monkeypatch.undo()

    build_index([str(corpus)], tmp_path / "faiss", embedder=embedder)
    with pytest.raises(CepeRagError, match="is a faiss index, not a qdrant one"):
        check_store_options(tmp_path / "faiss", None, url="http://localhost:6333")
    with pytest.raises(CepeRagError, match="FAISS index"):
        open_store(tmp_path / "faiss", QdrantLocation())

    # Collections not made by cepe-rag, or for another embedder's width.
    client = QdrantClient(path=str(tmp_path / "shared"))
    client.create_collection("narrow", vectors_config=models.VectorParams(size=8, distance=models.Distance.COSINE))
    client.create_collection("foreign", vectors_config=models.VectorParams(size=384, distance=models.Distance.DOT))
    client.close()
    for name, message in (("narrow", "holds 8-d vectors"), ("foreign", "not made by cepe-rag")):
        with pytest.raises(CepeRagError, match=message):
            build_index([str(corpus)], tmp_path / name, embedder=embedder,
                        qdrant=QdrantLocation(path=str(tmp_path / "shared"), collection=name))

    empty = QdrantStore.create_or_open(tmp_path / "empty", json_manifest(index))
    with pytest.raises(CepeRagError, match="is empty"):
        empty.search(np.ones((1, 384), np.float32), 3)
    empty.close()


def json_manifest(index):
    from cepe_rag.indexes import Manifest

    data = json.loads((index / "manifest.json").read_text())
    return Manifest(embedder=data["embedder"], dimension=data["dimension"])


def test_a_new_folder_adopts_an_existing_collection_with_the_same_settings(embedder, corpus, tmp_path):  # noqa: F811
    shared = QdrantLocation(path=str(tmp_path / "cluster"), collection="docs")
    build_index([str(corpus)], tmp_path / "machine-a", embedder=embedder, qdrant=shared)
    again = build_index([str(corpus)], tmp_path / "machine-b", embedder=embedder, qdrant=shared)
    assert (again.documents_embedded, again.documents_unchanged) == (0, 4)
    manifest = json.loads((tmp_path / "machine-b" / "manifest.json").read_text())
    assert manifest["store"] == "qdrant" and manifest["qdrant"] == {"path": str(tmp_path / "cluster"),
                                                                    "collection": "docs"}
    store = open_store(tmp_path / "machine-a")
    assert store.count() == 4 and store.content_version() > 0


def test_the_langchain_retriever_reads_a_qdrant_index(embedder, corpus, tmp_path):  # noqa: F811
    from cepe_rag.integrations.langchain import CepeRetriever

    in_qdrant(embedder, [corpus], tmp_path / "idx")
    with pytest.raises(CepeRagError, match="collection 'nope' is missing"):
        CepeRetriever(index=str(tmp_path / "idx"), qdrant_collection="nope").invoke("Kubrick")
    documents = CepeRetriever(index=str(tmp_path / "idx"), k=2).invoke("Who directed 2001: A Space Odyssey?")
    assert documents[0].metadata["source"].endswith("kubrick.txt") and len(documents) == 2
    assert documents[0].metadata["lexical_score"] is None  # hybrid, answered densely
