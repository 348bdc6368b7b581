"""Indexing throughput, single process against Ray with 1 and 2 workers, and the same index from each.

    python benchmarks/ray_indexing.py [--limit N] [--workers 1 2] [--out benchmarks/results/scaling]

In one process, on the same corpus (the demo corpus, or its first N documents), each engine indexes into an
empty folder: `build_index` (read, hash, split, embed, SQLite, FAISS), with the driver's embedder loaded once
beforehand for all runs. The local Ray instance (`ray.init(num_cpus=<this machine's cores>)`) is started before
the timings and its start-up reported apart; each Ray run includes starting its actors (each loads the
embedder). Every Ray index is compared with the single-process one: same documents and passages (same ids),
largest embedding difference, and the same exact (Flat) top-10 for one question per 20 passages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np

from cepe_rag.documents.loading import demo_corpus_path
from cepe_rag.models import load_embedder
from cepe_rag.pipelines.indexing import build_index
from cepe_rag.pipelines.ray_indexing import RayEngine, connect
from cepe_rag.retrieval import Retriever


def index_rows(index: Path) -> tuple[list, np.ndarray]:
    with sqlite3.connect(index / "passages.sqlite") as db:
        rows = db.execute("SELECT id, doc_key, position, title, text, source, embedding FROM passages "
                          "ORDER BY id").fetchall()
    return [r[:6] for r in rows], np.stack([np.frombuffer(r[6], dtype=np.float32) for r in rows])


def compare(index: Path, reference: Path, embedder, questions: list[str]) -> dict:
    rows, vectors = index_rows(index)
    ref_rows, ref_vectors = index_rows(reference)
    same_passages = rows == ref_rows
    ours, theirs = Retriever(index, embedder=embedder), Retriever(reference, embedder=embedder)
    same_top = sum([p.id for p in ours.retrieve(q, k=10)] == [p.id for p in theirs.retrieve(q, k=10)]
                   for q in questions)
    return {"same_passages": same_passages, "passages": len(rows), "reference_passages": len(ref_rows),
            "max_embedding_difference": float(np.abs(vectors - ref_vectors).max()) if same_passages else None,
            "questions": len(questions), "same_top10": int(same_top)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=0, help="documents to use (0 = the whole demo corpus)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts to measure")
    parser.add_argument("--batch-documents", type=int, default=32, help="documents per Ray actor call")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scaling"))
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    workdir = Path(tempfile.mkdtemp(prefix="cepe-ray-bench-"))
    source = demo_corpus_path()
    if args.limit:
        data = json.loads(source.read_text())
        source = workdir / "corpus.json"
        source.write_text(json.dumps(dict(list(data.items())[: args.limit])))
    embedder = load_embedder()
    cores = os.cpu_count()
    started = time.perf_counter()
    import ray  # the optional extra; the engine imports it too

    ray.init(num_cpus=cores, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    connect()
    ray_init_s = time.perf_counter() - started

    runs = []
    for name, engine in [("single process", None)] + [
            (f"ray, {n} worker{'s' if n > 1 else ''}", RayEngine(workers=n, batch_documents=args.batch_documents))
            for n in args.workers]:
        folder = workdir / f"index-{len(runs)}"
        load_before = os.getloadavg()[0]
        summary = build_index([source], folder, embedder=embedder, engine=engine)
        runs.append({"engine": name, "workers": engine.workers if engine else None, "folder": folder,
                     "passages": summary.passages_total, "documents": summary.documents_seen,
                     "seconds": round(summary.seconds, 2),
                     "passages_per_s": round(summary.passages_total / summary.seconds, 1),
                     "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2)})
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "folder"}), flush=True)
    ray.shutdown()

    reference = runs[0]["folder"]
    titles = [row[3] for row in index_rows(reference)[0][::20]]
    questions = [f"What is {title}?" for title in titles]
    for run in runs[1:]:
        run["same_as_single_process"] = compare(run["folder"], reference, embedder, questions)
    for run in runs:
        run["speedup"] = round(runs[0]["seconds"] / run["seconds"], 2)
        del run["folder"]
    result = {"corpus": "demo" + (f" (first {args.limit} documents)" if args.limit else ""),
              "machine": f"{platform.processor() or platform.machine()}, {cores} cores",
              "ray_version": ray.__version__, "ray_init_seconds": round(ray_init_s, 2),
              "ray_batch_documents": args.batch_documents, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ray_indexing.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"Indexing {runs[0]['passages']:,} passages ({result['corpus']} corpus) on {result['machine']}; "
             f"Ray {ray.__version__}, local instance (start-up {ray_init_s:.1f} s, not counted).", "",
             "| engine | seconds | passages/s | vs single process | same passages | same top-10 | load avg |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        same = run.get("same_as_single_process")
        lines.append(f"| {run['engine']} | {run['seconds']:.1f} | {run['passages_per_s']:.1f} | "
                     f"{run['speedup']:.2f}x | "
                     + (f"{'yes' if same['same_passages'] else 'NO'} (max embedding diff "
                        f"{same['max_embedding_difference']:.1e}) | {same['same_top10']}/{same['questions']}"
                        if same else "reference | reference")
                     + f" | {run['load_average_before']:.1f} |")
    (args.out / "ray_indexing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
