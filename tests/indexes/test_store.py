"""The store's document catalogue: what `cepe-rag docs` reads, without loading FAISS."""

import json

from cepe_rag.indexes import IndexStore
from cepe_rag.pipelines.indexing import build_index


def test_document_list_and_passages(embedder, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "film.md").write_text("# Kubrick\n\n" + "\n\n".join(f"Paragraph {i} about the film." * 8
                                                                  for i in range(12)))
    (corpus / "records.jsonl").write_text(json.dumps({"id": "b", "contents": "Second\nbody b"}) + "\n"
                                          + json.dumps({"id": "a", "contents": "First\nbody a"}) + "\n")
    build_index([str(corpus)], tmp_path / "idx", embedder=embedder, chunk_tokens=64, overlap_tokens=8)

    store = IndexStore.open_catalog(tmp_path / "idx")
    assert store._faiss is None and not store.faiss_is_stale  # FAISS is not loaded, and is up to date
    documents = store.document_list()
    film = str(corpus / "film.md")
    assert [(d.source, d.key, d.title) for d in documents] == [
        (film, film, "Kubrick"),
        (str(corpus / "records.jsonl"), f"{corpus / 'records.jsonl'}#a", "First"),
        (str(corpus / "records.jsonl"), f"{corpus / 'records.jsonl'}#b", "Second"),
    ]
    assert documents[0].passages > 3 and sum(d.passages for d in documents) == store.count()
    assert len(documents[0].digest) == 64
    passages = store.document_passages(film)
    assert [p.position for p in passages] == list(range(documents[0].passages))
    assert passages[0].text.startswith("Paragraph 0") and {p.title for p in passages} == {"Kubrick"}
    assert store.document_passages("no such key") == []
    store.close()

    (tmp_path / "idx" / "index.faiss").unlink()  # as after a run killed before its FAISS file was written
    assert IndexStore.open_catalog(tmp_path / "idx").faiss_is_stale
