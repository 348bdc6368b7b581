"""Indexing overhead over raw SentenceTransformer.encode on the same passages (target: under 10%).

    python benchmarks/indexing_throughput.py [--limit N] [--context-states] [--out benchmarks/results/indexing.json]

Both rates are measured in one process on the demo corpus: raw encode, full indexing (read, split,
embed, SQLite, FAISS, from an empty folder), raw encode again; the ratio uses the mean of the two raw runs.
With --context-states, the same corpus is then indexed again into another empty folder storing the shipped CEPE
adapter's encoder states too: passages/s and bytes on disk with and without them, in the same process.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from cepe_rag.documents import LoadReport, PassageSplitter, iter_documents
from cepe_rag.documents.loading import demo_corpus_path
from cepe_rag.models import embed_texts, load_embedder
from cepe_rag.pipelines.indexing import build_index, passage_embedding_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=0, help="documents to use (0 = the whole corpus)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/indexing.json"))
    parser.add_argument("--context-states", action="store_true", help="also index with stored CEPE states")
    args = parser.parse_args()

    embedder = load_embedder()
    corpus = demo_corpus_path()
    workdir = Path(tempfile.mkdtemp(prefix="cepe-bench-"))
    source = corpus
    if args.limit:
        data = json.loads(corpus.read_text())
        source = workdir / "corpus.json"
        source.write_text(json.dumps(dict(list(data.items())[: args.limit])))
    splitter = PassageSplitter(embedder.tokenizer)
    texts = [passage_embedding_text(doc.title, chunk)
             for doc in iter_documents([source], LoadReport()) for chunk in splitter.split(doc.text)]

    def raw_encode() -> float:
        started = time.perf_counter()
        embed_texts(embedder, texts)
        return time.perf_counter() - started

    raw_first = raw_encode()
    started = time.perf_counter()
    summary = build_index([source], workdir / "index", embedder=embedder)
    index_s = time.perf_counter() - started
    raw_second = raw_encode()
    raw_s = (raw_first + raw_second) / 2
    assert summary.passages_total == len(texts)
    result = {
        "passages": len(texts), "documents": summary.documents_seen,
        "raw_encode_s": [round(raw_first, 2), round(raw_second, 2)], "index_s": round(index_s, 2),
        "raw_passages_per_s": round(len(texts) / raw_s, 1), "index_passages_per_s": round(len(texts) / index_s, 1),
        "overhead": round(index_s / raw_s - 1, 4), "index_disk_mib": round(summary.disk_bytes / 2**20, 1),
        "environment": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__},
    }
    if args.context_states:
        from cepe_rag.cepe import load_cepe
        from cepe_rag.cepe.states import StateEncoder
        from cepe_rag.settings import packaged_cepe

        encoder = StateEncoder(load_cepe(packaged_cepe()))
        started = time.perf_counter()
        with_states = build_index([source], workdir / "index_states", embedder=embedder, state_encoder=encoder)
        states_s = time.perf_counter() - started
        def folder_bytes(folder: Path) -> int:  # after the run closed it (the summary counts the SQLite WAL too)
            return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())

        plain_bytes, states_bytes = folder_bytes(workdir / "index"), folder_bytes(workdir / "index_states")
        extra_bytes = states_bytes - plain_bytes
        result["with_context_states"] = {
            "index_s": round(states_s, 2), "index_passages_per_s": round(len(texts) / states_s, 1),
            "states_encode_s": round(with_states.states_seconds, 2),
            "index_disk_mib": round(states_bytes / 2**20, 1), "plain_index_disk_mib": round(plain_bytes / 2**20, 1),
            "extra_bytes_per_passage": round(extra_bytes / len(texts)),
            "slowdown": round(states_s / index_s, 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print("\n| passages | raw encode (passages/s) | indexing (passages/s) | overhead | index on disk |")
    print("|---|---|---|---|---|")
    print(f"| {len(texts)} | {result['raw_passages_per_s']} | {result['index_passages_per_s']} | "
          f"{result['overhead']:.1%} | {result['index_disk_mib']} MiB |")
    if args.context_states:
        states = result["with_context_states"]
        print(f"\nwith context states: {states['index_passages_per_s']} passages/s ({states['slowdown']}x the time), "
              f"{states['index_disk_mib']} MiB on disk, {states['extra_bytes_per_passage']:,} more bytes per passage")


if __name__ == "__main__":
    main()
