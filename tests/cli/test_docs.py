"""`cepe-rag docs list/show/remove` and `index --include/--exclude` through the real command line."""

import json
import shutil
import subprocess
import sys

import faiss
import pytest

from cepe_rag.indexes import IndexStore, writer_lock
from cepe_rag.pipelines.indexing import build_index
from tests.cli.test_cli import assert_one_line_error, run_cli
from tests.documents.test_loading import write_docx

pytestmark = pytest.mark.real_models


@pytest.fixture(scope="module")
def docs_index(tmp_path_factory, embedder):
    """Indexed in-process (the embedder is loaded once), then re-indexed by the CLI with an --exclude."""
    root = tmp_path_factory.mktemp("docs")
    corpus = root / "corpus"
    (corpus / "drafts").mkdir(parents=True)
    (corpus / "film.md").write_text("# Kubrick\n\n2001: A Space Odyssey was directed by Stanley Kubrick.")
    (corpus / "tower.txt").write_text("The Eiffel Tower is in Paris.")
    (corpus / "records.jsonl").write_text(json.dumps({"id": "1", "contents": "One\nfirst record"}) + "\n"
                                          + json.dumps({"id": "2", "contents": "Two\nsecond record"}) + "\n")
    write_docx(corpus / "report.docx", ["Quarterly Report", "Revenue grew by 12 percent."])
    (corpus / "people.csv").write_text("name,born\nAda Lovelace,1815\n")
    (corpus / "drafts" / "plan.txt").write_text("[draft] a plan that is not ready")
    (root / "other").mkdir()
    (root / "other" / "tower.txt").write_text("Another tower, in another folder.")
    build_index([str(corpus), str(root / "other")], root / "idx", embedder=embedder)
    result = run_cli("index", corpus, "--index", root / "idx", "--exclude", "drafts/**", "--include", "*")
    assert result.returncode == 0, result.stderr
    assert "6 unchanged, 1 deleted (1 now excluded by the filters), 0 skipped" in result.stderr
    return root


def copy_of(docs_index, tmp_path):
    shutil.copytree(docs_index / "idx", tmp_path / "idx")
    return tmp_path / "idx"


def test_list_shows_one_row_per_document_and_the_statistics(docs_index):
    result = run_cli("docs", "list", "--index", docs_index / "idx")
    assert result.returncode == 0, result.stderr
    for cell in ("film.md", "Kubrick", "Quarterly Report", "records.jsonl", "#1", "#2", "people.csv"):
        assert cell in result.stdout
    assert "plan.txt" not in result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith(
        f"{docs_index / 'idx'}: 7 documents, 7 passages · embedder all-minilm-l6-v2 · faiss Flat · chunks of 256 "
        "tokens (32 overlap) · content version 2 · ")


def test_list_as_json_and_by_source(docs_index):
    result = run_cli("docs", "list", "--index", docs_index / "idx", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    statistics = listing["statistics"]
    assert {key: statistics[key] for key in ("documents", "passages", "embedder", "faiss_factory", "chunk_tokens",
                                             "content_version", "faiss_up_to_date")} == {
        "documents": 7, "passages": 7, "embedder": "all-minilm-l6-v2", "faiss_factory": "Flat", "chunk_tokens": 256,
        "content_version": 2, "faiss_up_to_date": True}
    assert statistics["disk_bytes"] > 0
    film = next(d for d in listing["documents"] if d["source"].endswith("film.md"))
    assert (film["title"], film["passages"], len(film["digest"])) == ("Kubrick", 1, 64)
    assert film["key"] == film["source"] == str(docs_index / "corpus" / "film.md")

    tails = run_cli("docs", "list", "--index", docs_index / "idx", "--json", "--source", "*.txt")
    assert sorted(d["source"][len(str(docs_index)):] for d in json.loads(tails.stdout)["documents"]) == [
        "/corpus/tower.txt", "/other/tower.txt"]
    narrowed = run_cli("docs", "list", "--index", docs_index / "idx", "--source", "corpus/*.txt")
    assert "1 of 7 documents match 'corpus/*.txt'" in narrowed.stdout


def test_docs_commands_load_no_model(docs_index):
    code = ("import sys\nfrom cepe_rag.cli.app import app\n"
            f"for args in (['list', '--json'], ['show', 'film.md']):\n"
            f"    try:\n        app(['docs', *args, '--index', {str(docs_index / 'idx')!r}])\n"
            "    except SystemExit as done:\n        assert not done.code, done.code\n"
            "heavy = {'torch', 'transformers', 'sentence_transformers', 'langchain_text_splitters'}\n"
            "print(sorted(heavy & set(sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_show_prints_a_documents_passages(docs_index):
    result = run_cli("docs", "show", "corpus/report.docx", "--index", docs_index / "idx")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(f"{docs_index / 'corpus' / 'report.docx'} · 1 passage · digest ")
    assert "[0] Quarterly Report\nRevenue grew by 12 percent." in result.stdout
    exact = run_cli("docs", "show", docs_index / "corpus" / "film.md", "--index", docs_index / "idx")
    assert "[0] Kubrick\n2001: A Space Odyssey" in exact.stdout
    record = run_cli("docs", "show", "records.jsonl#2", "--index", docs_index / "idx")
    assert "[0] Two\nsecond record" in record.stdout


@pytest.mark.parametrize("source,fragment", [
    ("nope.txt", "no document in"),
    ("ilm.md", "no document in"),  # the end of a path means whole path segments
    ("tower.txt", "'tower.txt' is the end of 2 paths"),
    ("records.jsonl", "'records.jsonl' matches 2 documents"),
])
def test_show_errors_are_one_line(docs_index, source, fragment):
    assert_one_line_error(run_cli("docs", "show", source, "--index", docs_index / "idx"), fragment)


def test_remove_documents_keeps_faiss_and_sqlite_consistent(docs_index, tmp_path):
    index = copy_of(docs_index, tmp_path)
    result = run_cli("docs", "remove", "corpus/*.jsonl", "corpus/tower.txt", "--index", index)
    assert result.returncode == 0, result.stderr
    assert f"{index}: removed 3 documents (3 passages); 4 documents, 4 passages left" in result.stderr
    assert "2 of these files still exist" in result.stderr
    store = IndexStore.open(index)
    assert not store.faiss_is_stale and store.content_version() == 3
    stored_ids = sorted(row[0] for row in store.db.execute("SELECT id FROM passages"))
    assert sorted(faiss.vector_to_array(store._faiss.id_map).tolist()) == stored_ids
    assert sorted(d.source.rsplit("/", 2)[-2] + "/" + d.source.rsplit("/", 1)[-1] for d in store.document_list()) == [
        "corpus/film.md", "corpus/people.csv", "corpus/report.docx", "other/tower.txt"]

    folder = run_cli("docs", "remove", docs_index / "other", "--index", index)  # a folder: all its documents
    assert "removed 1 document (1 passages); 3 documents, 3 passages left" in folder.stderr
    assert IndexStore.open(index)._faiss.ntotal == 3


def test_remove_with_an_unmatched_argument_changes_nothing(docs_index, tmp_path):
    index = copy_of(docs_index, tmp_path)
    assert_one_line_error(run_cli("docs", "remove", "film.md", "nothing-*.pdf", "--index", index),
                          "no document in")
    assert_one_line_error(run_cli("docs", "remove", "tower.txt", "--index", index), "is the end of 2 paths")
    store = IndexStore.open(index)
    assert (store.count(), store.content_version()) == (7, 2)


def test_remove_waits_for_no_writer_and_needs_an_index(docs_index, tmp_path):
    index = copy_of(docs_index, tmp_path)
    with writer_lock(index):  # an `index` run is writing
        assert_one_line_error(run_cli("docs", "remove", "film.md", "--index", index), "is writing to")
    assert IndexStore.open(index).count() == 7
    assert_one_line_error(run_cli("docs", "remove", "film.md", "--index", tmp_path / "none"), "no index at")
    assert not (tmp_path / "none").exists()
    assert_one_line_error(run_cli("docs", "list", "--index", docs_index / "corpus"), "is not a cepe-rag index")
    assert_one_line_error(run_cli("docs", "list", "--index", index, "--source", ""), "empty glob pattern")
