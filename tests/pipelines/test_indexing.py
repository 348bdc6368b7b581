import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from cepe_rag.indexes import IndexStore
from cepe_rag.pipelines.indexing import build_index
from cepe_rag.retrieval import Retriever
from cepe_rag.types import CepeRagError

FACTS = {
    "kubrick.txt": "2001: A Space Odyssey is a 1968 film directed by Stanley Kubrick.",
    "eiffel.txt": "The Eiffel Tower in Paris was completed in 1889 for the World's Fair.",
    "otters.md": "Sea otters use rocks as tools to crack open shellfish.",
    "everest.txt": "Mount Everest is the highest mountain above sea level, in the Himalayas.",
}


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, text in FACTS.items():
        (folder / name).write_text(text)
    return folder


def index_with(embedder, sources, folder, **kwargs):
    return build_index([str(s) for s in sources], folder, embedder=embedder, **kwargs)


def test_build_and_retrieve(embedder, corpus, tmp_path):
    summary = index_with(embedder, [corpus], tmp_path / "idx")
    assert (summary.documents_embedded, summary.passages_total) == (4, 4)
    retriever = Retriever(tmp_path / "idx", embedder=embedder)
    top = retriever.retrieve("Who directed 2001: A Space Odyssey?", k=2)
    assert top[0].title == "kubrick" and top[0].source.endswith("kubrick.txt")
    assert top[0].score > top[1].score
    # Every passage is its own nearest neighbour: retrieval returns what was stored.
    for text in FACTS.values():
        assert retriever.retrieve(text, k=1)[0].text == text


def test_k_larger_than_corpus_returns_everything(embedder, corpus, tmp_path):
    index_with(embedder, [corpus], tmp_path / "idx")
    assert len(Retriever(tmp_path / "idx", embedder=embedder).retrieve("anything", k=1000)) == 4


def test_incremental_update_embeds_only_changes(embedder, corpus, tmp_path):
    index = tmp_path / "idx"
    index_with(embedder, [corpus], index)
    again = index_with(embedder, [corpus], index)
    assert (again.documents_embedded, again.documents_unchanged, again.passages_added) == (0, 4, 0)

    (corpus / "otters.md").write_text("River otters live in burrows near water.")
    (corpus / "everest.txt").unlink()
    (corpus / "new.txt").write_text("The Nile is a river in Africa.")
    changed = index_with(embedder, [corpus], index)
    assert (changed.documents_embedded, changed.documents_unchanged, changed.documents_deleted) == (2, 2, 1)
    assert changed.passages_total == 4

    retriever = Retriever(index, embedder=embedder)
    texts = {p.text for p in retriever.retrieve("otters rivers mountains Nile", k=10)}
    assert "River otters live in burrows near water." in texts
    assert FACTS["otters.md"] not in texts and FACTS["everest.txt"] not in texts
    assert retriever.store.count() == retriever.store._faiss.ntotal


def test_other_sources_in_the_same_index_are_kept(embedder, corpus, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("Another corpus entirely.")
    index_with(embedder, [corpus], tmp_path / "idx")
    summary = index_with(embedder, [other], tmp_path / "idx")
    assert summary.documents_deleted == 0 and summary.passages_total == 5


def test_long_document_is_split_into_bounded_passages(embedder, tmp_path):
    folder = tmp_path / "long"
    folder.mkdir()
    (folder / "long.txt").write_text("\n\n".join(f"Paragraph {i} is about the number {i}." * 5 for i in range(100)))
    summary = index_with(embedder, [folder], tmp_path / "idx", chunk_tokens=64, overlap_tokens=8)
    assert summary.passages_total > 10
    store = IndexStore.open(tmp_path / "idx")
    lengths = [len(embedder.tokenizer(t, add_special_tokens=False)["input_ids"])
               for (t,) in store.db.execute("SELECT text FROM passages")]
    assert max(lengths) <= 64


@pytest.mark.parametrize("factory", ["HNSW16", "IVF2,Flat"])
def test_other_faiss_factories_including_trained_ones(embedder, corpus, tmp_path, factory):
    index_with(embedder, [corpus], tmp_path / "idx", faiss_factory=factory)
    (corpus / "everest.txt").unlink()
    index_with(embedder, [corpus], tmp_path / "idx", faiss_factory=factory)  # removal: HNSW must rebuild
    retriever = Retriever(tmp_path / "idx", embedder=embedder)
    assert retriever.store._faiss.ntotal == 3
    assert retriever.retrieve("Who directed 2001: A Space Odyssey?", k=3)[0].title == "kubrick"


def test_empty_folder_is_a_clear_error(embedder, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CepeRagError, match="no readable documents"):
        index_with(embedder, [tmp_path / "empty"], tmp_path / "idx")


def test_foreign_and_mismatched_folders_are_refused(embedder, corpus, tmp_path):
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "important.doc").write_text("do not touch")
    with pytest.raises(CepeRagError, match="not a cepe-rag index"):
        index_with(embedder, [corpus], stranger)
    assert (stranger / "important.doc").read_text() == "do not touch"

    index_with(embedder, [corpus], tmp_path / "idx")
    with pytest.raises(CepeRagError, match="chunk_tokens"):
        index_with(embedder, [corpus], tmp_path / "idx", chunk_tokens=128)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    manifest["embedder"] = "someone-else/embedder"
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CepeRagError, match="embedder"):
        index_with(embedder, [corpus], tmp_path / "idx")
    manifest["format_version"] = 99
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CepeRagError, match="format version 99"):
        IndexStore.open(tmp_path / "idx")
    (tmp_path / "idx" / "manifest.json").write_text("{ not json")
    with pytest.raises(CepeRagError, match="unreadable manifest"):
        IndexStore.open(tmp_path / "idx")


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(CepeRagError, match="no index at"):
        IndexStore.open(tmp_path / "nowhere")


def test_corrupt_faiss_file_is_rebuilt_without_reembedding(embedder, corpus, tmp_path):
    index = tmp_path / "idx"
    index_with(embedder, [corpus], index)
    faiss_file = index / "index.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:100])
    damaged = faiss_file.read_bytes()
    reader = IndexStore.open(index)  # searches a copy rebuilt in memory, and says so; the file is left alone
    assert reader.faiss_is_stale and reader._faiss.ntotal == reader.count()
    assert faiss_file.read_bytes() == damaged
    summary = index_with(embedder, [corpus], index)
    assert summary.documents_embedded == 0
    assert Retriever(index, embedder=embedder).retrieve("Kubrick film", k=1)[0].title == "kubrick"


def test_corrupt_sqlite_is_refused_and_left_untouched(embedder, corpus, tmp_path):
    index = tmp_path / "idx"
    index_with(embedder, [corpus], index)
    db = index / "passages.sqlite"
    for extra in ("-wal", "-shm"):
        (index / f"passages.sqlite{extra}").unlink(missing_ok=True)
    garbage = b"this is not an sqlite database" * 100
    db.write_bytes(garbage)
    with pytest.raises(CepeRagError, match="corrupt"):
        IndexStore.open(index)
    with pytest.raises(CepeRagError, match="corrupt"):
        index_with(embedder, [corpus], index)
    assert db.read_bytes() == garbage


def test_truncated_sqlite_is_refused(embedder, corpus, tmp_path):
    index = tmp_path / "idx"
    index_with(embedder, [corpus], index)
    store = IndexStore.open(index)
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    db = index / "passages.sqlite"
    db.write_bytes(db.read_bytes()[: 2 * 4096 + 100])
    with pytest.raises(CepeRagError):
        Retriever(index, embedder=embedder).retrieve("Kubrick", k=2)


def test_interrupted_faiss_commit_is_detected_and_repaired(embedder, corpus, tmp_path):
    index = tmp_path / "idx"
    index_with(embedder, [corpus], index)
    (corpus / "new.txt").write_text("The Danube flows through Vienna.")
    # Simulate a kill after the SQLite commit but before the FAISS file was replaced.
    store = IndexStore.create_or_open(index, IndexStore.open(index).manifest)
    vector = embedder.encode(["The Danube flows through Vienna."], normalize_embeddings=True)
    from cepe_rag.indexes import StoredPassage

    store.replace_documents([(str(corpus / "new.txt"), "stale-digest", str(corpus / "new.txt"))],
                            [StoredPassage(str(corpus / "new.txt"), 0, "new", "The Danube flows through Vienna.",
                                           str(corpus / "new.txt"))], np.asarray(vector))
    store.close()
    reopened = IndexStore.open(index)
    assert reopened.faiss_is_stale  # ask warns, and answers from every committed passage
    assert reopened.search(np.asarray(vector), 1)[0][0].text == "The Danube flows through Vienna."
    summary = index_with(embedder, [corpus], index)
    assert summary.documents_embedded == 1  # the digest differs, so the document is redone once
    fixed = IndexStore.open(index)
    assert not fixed.faiss_is_stale and fixed._faiss.ntotal == 5


def test_kill_minus_9_during_a_first_run_leaves_committed_batches_searchable(embedder, corpus, tmp_path):
    index = tmp_path / "idx"
    index_with(embedder, [corpus], index)
    (index / "index.faiss").unlink()  # a first run killed before its FAISS file was ever written
    store = IndexStore.open(index)
    assert store.faiss_is_stale and store._faiss.ntotal == store.count() == 4
    assert Retriever(store, embedder=embedder).retrieve("Kubrick film", k=1)[0].title == "kubrick"
    assert not (index / "index.faiss").exists()  # reading never writes


def test_kill_minus_9_during_indexing_keeps_previous_index_and_resumes(embedder, tmp_path):
    corpus = tmp_path / "many"
    corpus.mkdir()
    for i in range(400):
        (corpus / f"doc{i:03d}.txt").write_text(f"Document {i} describes item number {i} in some detail. " * 3)
    index = tmp_path / "idx"
    (tmp_path / "seed").mkdir()
    (tmp_path / "seed" / "kubrick.txt").write_text(FACTS["kubrick.txt"])
    index_with(embedder, [tmp_path / "seed"], index)

    code = (
        "import sys; from cepe_rag.pipelines.indexing import build_index\n"
        f"build_index([{str(corpus)!r}], {str(index)!r}, batch_passages=16)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until at least one batch is committed, then kill -9
        time.sleep(0.5)
        try:
            if IndexStore.open(index).count() > 20:
                break
        except CepeRagError:
            pass
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    store = IndexStore.open(index)
    committed = store.count()
    assert 1 < committed < 401
    retriever = Retriever(index, embedder=embedder)
    assert retriever.retrieve("Who directed 2001?", k=1)[0].title == "kubrick"
    resumed = index_with(embedder, [corpus], index)
    assert resumed.documents_unchanged == committed - 1
    assert resumed.passages_total == 401
    assert IndexStore.open(index)._faiss.ntotal == 401


def test_a_second_writer_on_the_same_index_stops_at_once(corpus, tmp_path):
    from cepe_rag.indexes import writer_lock

    index = tmp_path / "idx"
    with writer_lock(index):  # this process is the first writer; the second is a real `cepe-rag index`
        result = subprocess.run([sys.executable, "-m", "cepe_rag", "index", str(corpus), "--index", str(index)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "another `cepe-rag index` is writing to" in result.stderr
    assert not (index / "passages.sqlite").exists()  # it stopped before touching the index
    with writer_lock(index):  # released when its holder is done; taken again
        pass


def test_documents_the_filters_now_leave_out_are_removed_like_deleted_ones(embedder, corpus, tmp_path):
    index = tmp_path / "idx"
    index_with(embedder, [corpus], index)
    (corpus / "drafts").mkdir()
    (corpus / "drafts" / "nile.txt").write_text("The Nile is a river in Africa.")
    index_with(embedder, [corpus], index)
    store = IndexStore.open(index)
    assert store.count() == 5
    store.close()

    filtered = index_with(embedder, [corpus], index, include=["*.txt"], exclude=["drafts/**"])
    assert (filtered.documents_seen, filtered.documents_embedded, filtered.documents_unchanged) == (3, 0, 3)
    assert (filtered.documents_deleted, filtered.documents_excluded, filtered.passages_total) == (2, 2, 3)
    retriever = Retriever(index, embedder=embedder)
    assert {p.title for p in retriever.retrieve("otters rivers Nile", k=10)} == {"kubrick", "eiffel", "everest"}
    assert retriever.store.count() == retriever.store._faiss.ntotal == 3
    assert not retriever.store.faiss_is_stale

    (corpus / "eiffel.txt").unlink()  # deleted (not excluded) while the filters are on
    deleted = index_with(embedder, [corpus], index, include=["*.txt"], exclude=["drafts/**"])
    assert (deleted.documents_deleted, deleted.documents_excluded) == (1, 0)

    everything = index_with(embedder, [corpus], index)  # without the filters, the folder contributes all again
    assert (everything.documents_embedded, everything.documents_unchanged, everything.passages_total) == (2, 2, 4)


def test_filters_that_leave_no_document_change_nothing(embedder, corpus, tmp_path):
    index = tmp_path / "idx"
    index_with(embedder, [corpus], index)
    before = IndexStore.open(index)
    count, version = before.count(), before.content_version()
    before.close()
    with pytest.raises(CepeRagError, match="passes --include/--exclude: nothing was removed"):
        index_with(embedder, [corpus], index, include=["*.mdx"])  # a typo must not empty the index
    after = IndexStore.open(index)
    assert (after.count(), after.content_version()) == (count, version)
    with pytest.raises(CepeRagError, match="empty glob pattern"):
        index_with(embedder, [corpus], index, exclude=[""])


def test_docx_and_csv_rows_are_retrievable(embedder, tmp_path):
    from tests.documents.test_loading import write_docx

    folder = tmp_path / "office"
    folder.mkdir()
    write_docx(folder / "minutes.docx", ["Board Minutes", "The board approved the new lighthouse in Velmarra."])
    (folder / "staff.csv").write_text("name,role,office\nMaria Tollund,bridge engineer,Velmarra\n"
                                      "Henrik Solberg,architect,Dunn\n")
    (folder / "broken.docx").write_bytes(b"PK but not really a zip")
    summary = index_with(embedder, [folder], tmp_path / "idx")
    assert (summary.documents_embedded, len(summary.skipped)) == (2, 1)
    assert "broken.docx: not a .docx file" in summary.skipped[0]
    retriever = Retriever(tmp_path / "idx", embedder=embedder)
    top = retriever.retrieve("Who is the bridge engineer?", k=1)[0]
    assert top.source.endswith("staff.csv") and "name: Maria Tollund; role: bridge engineer" in top.text
    top = retriever.retrieve("What did the board approve?", k=1)[0]
    assert top.title == "Board Minutes" and "lighthouse" in top.text
