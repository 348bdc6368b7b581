"""Could stored CEPE states and retrieval embeddings come from one encoder pass?

The shipped adapter's encoder is the retrieval embedder (frozen MiniLM, same tokenization), but it reads a passage as
the CEPE chunk text ("Document (Title: …): …") while retrieval embeds "title\\ntext". One pass would mean embedding
passages as the chunk text. Dense recall on the NQ-500 questions both ways (the demo index's passages re-embedded in
memory; the index is not changed):

    OMP_NUM_THREADS=1 python benchmarks/chunk_text_recall.py
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import faiss
import numpy as np

from cepe_rag.eval.data import load_questions
from cepe_rag.eval.metrics import answer_in_passages
from cepe_rag.eval.runner import answerable_subset
from cepe_rag.models import embed_texts, load_query_embedder
from cepe_rag.retrieval import Retriever
from cepe_rag.types import Passage

INDEX = "indexes/default"
QUESTIONS = "../shared/data/nq_open/NQ-open.dev.jsonl"
OUT = Path("benchmarks/results/context_states/chunk_text_recall.json")


def main() -> None:
    with sqlite3.connect(f"{INDEX}/passages.sqlite") as db:
        rows = db.execute("SELECT id, title, text FROM passages ORDER BY id").fetchall()
    embedder = load_query_embedder()
    texts = [Passage(id=pid, text=text, title=title).as_prompt_text() for pid, title, text in rows]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding per batch
    vectors = np.zeros((len(texts), embedder.get_embedding_dimension()), np.float32)
    for start in range(0, len(order), 256):
        chosen = order[start:start + 256]
        vectors[chosen] = embed_texts(embedder, [texts[i] for i in chosen])
    chunk_index = faiss.IndexFlatIP(vectors.shape[1])
    chunk_index.add(vectors)

    retriever = Retriever(INDEX, embedder, mode="dense")
    questions = answerable_subset(load_questions(QUESTIONS), retriever)[:500]
    _, found = chunk_index.search(embed_texts(embedder, [q.question for q in questions]), 50)
    stored = retriever.retrieve_batch([q.question for q in questions], 50)
    result = {"questions": len(questions), "passages": len(rows), "recall": {}}
    for k in (5, 20, 50):
        chunk = [answer_in_passages([rows[j][1] + " " + rows[j][2] for j in row[:k]], q.answers)
                 for q, row in zip(questions, found)]
        title_text = [answer_in_passages([p.title + " " + p.text for p in passages[:k]], q.answers)
                      for q, passages in zip(questions, stored)]
        result["recall"][f"@{k}"] = {"chunk_text": 100 * float(np.mean(chunk)),
                                     "title_newline_text": 100 * float(np.mean(title_text))}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
