"""A large index on one machine: 200k passages in an IVF-PQ index, its build's peak memory, size and recall.

Embedding 200k passages with MiniLM on a 2-core machine takes hours (12 passages/s measured under load), so this
benchmark drives the real store (`IndexStore.replace_documents` in batches of 1024, then `commit_faiss`, exactly
what `cepe-rag index` calls) with SYNTHETIC embeddings that have the structure of real ones: each is a real
MiniLM passage embedding of the demo index (10,079 Wikipedia summaries), plus a third of another one, plus
Gaussian noise, L2-normalised; its text is 3-5 sentences of the same summary (~100 words, the length of
FlashRAG's Wikipedia passages). The report puts the cosine similarities of nearest neighbours in this corpus
next to those of the real demo embeddings, so one can judge how alike they are.

Every phase runs in its own process, so its peak resident memory (ru_maxrss) is its own:
  build    passages + embeddings into SQLite in batches, then the IVF-PQ index trained on a sample and filled
           from SQLite in batches, written with faiss.write_index
  flat     the same SQLite, its FAISS index rebuilt as Flat (what an exact index costs, for comparison)
  search   the IVF-PQ index opened memory-mapped as `cepe-rag ask` opens it, recall@10 against exact search
           over the same vectors at several nprobe values, and the memory-mapped and in-memory loads compared

    nice -n 10 python benchmarks/large_index.py --passages 200000 --factory IVF1024,PQ32
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEMO_INDEX = Path(__file__).resolve().parents[1] / "indexes" / "default"
BATCH = 1024


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def load_demo(demo: Path) -> tuple[np.ndarray, list[str], list[list[str]]]:
    db = sqlite3.connect(demo / "passages.sqlite")
    rows = db.execute("SELECT title, text, embedding FROM passages ORDER BY id").fetchall()
    db.close()
    embeddings = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), -1).copy()
    sentences = [[s for s in re.split(r"(?<=[.!?])\s+", r[1]) if len(s) > 20] or [r[1]] for r in rows]
    return embeddings, [r[0] for r in rows], sentences


def synthetic(centers: np.ndarray, count: int, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """(center of each vector, the vectors): a real embedding + 1/3 of another + Gaussian noise, normalised."""
    rng = np.random.default_rng(seed)
    first = rng.integers(0, len(centers), count)
    second = rng.integers(0, len(centers), count)
    vectors = centers[first] + centers[second] / 3 + rng.normal(0, noise, (count, centers.shape[1])).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return first, vectors.astype(np.float32)


def phase_build(args) -> dict:
    from cepe_rag.indexes.store import IndexStore, Manifest, StoredPassage

    baseline = current_rss_mib()
    centers, titles, sentences = load_demo(args.demo)
    folder = args.work / "ivfpq"
    shutil.rmtree(folder, ignore_errors=True)
    store = IndexStore.create_or_open(folder, Manifest(embedder="synthetic", dimension=centers.shape[1],
                                                      faiss_factory=args.factory))
    rng = np.random.default_rng(1)
    started = time.perf_counter()
    for start in range(0, args.passages, BATCH):
        n = min(BATCH, args.passages - start)
        first, vectors = synthetic(centers, n, seed=10_000 + start, noise=args.noise)
        documents, passages = [], []
        for offset, center in enumerate(first):
            number = start + offset
            picked = sentences[center]
            text = " ".join(picked[i] for i in rng.integers(0, len(picked), rng.integers(3, 6)))
            key = f"synthetic/part{number // 100_000}.jsonl#{number}"
            documents.append((key, f"{number:064x}", f"synthetic/part{number // 100_000}.jsonl"))
            passages.append(StoredPassage(key, 0, titles[center], text, documents[-1][2]))
        store.replace_documents(documents, passages, vectors)
    sqlite_seconds = time.perf_counter() - started
    peak_before_faiss = peak_rss_mib()
    started = time.perf_counter()
    store.commit_faiss()
    faiss_seconds = time.perf_counter() - started
    text_bytes = store.db.execute("SELECT SUM(LENGTH(text)) FROM passages").fetchone()[0]
    store.close()
    return {"sqlite_seconds": sqlite_seconds, "faiss_seconds": faiss_seconds,
            "peak_rss_mib_before_faiss": peak_before_faiss, "peak_rss_mib": peak_rss_mib(),
            "baseline_rss_mib": baseline, "text_bytes": text_bytes,
            "sqlite_bytes": (folder / "passages.sqlite").stat().st_size,
            "faiss_bytes": (folder / "index.faiss").stat().st_size}


def phase_flat(args) -> dict:
    """The same SQLite with a Flat FAISS index rebuilt from it: what exact search costs."""
    from cepe_rag.indexes.store import IndexStore, Manifest

    baseline = current_rss_mib()
    folder = args.work / "flat"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy(args.work / "ivfpq" / "passages.sqlite", folder / "passages.sqlite")
    manifest = Manifest.read(args.work / "ivfpq")
    manifest.faiss_factory = "Flat"
    manifest.write(folder)
    store = IndexStore.create_or_open(folder, manifest)  # no FAISS file: rebuilt by commit_faiss
    started = time.perf_counter()
    store.commit_faiss()
    seconds = time.perf_counter() - started
    store.close()
    return {"faiss_seconds": seconds, "peak_rss_mib": peak_rss_mib(), "baseline_rss_mib": baseline,
            "faiss_bytes": (folder / "index.faiss").stat().st_size}


def phase_search(args) -> dict:
    import faiss

    from cepe_rag.indexes.faiss_file import read_faiss
    from cepe_rag.indexes.store import IndexStore

    centers, _, _ = load_demo(args.demo)
    _, queries = synthetic(centers, args.queries, seed=7, noise=args.noise)
    before = current_rss_mib()
    started = time.perf_counter()
    store = IndexStore.open(args.work / "ivfpq")
    open_seconds = time.perf_counter() - started
    mapped_rss = current_rss_mib() - before
    ivf = faiss.extract_index_ivf(store._faiss)
    default_nprobe = ivf.nprobe

    # Exact top-10 over the very same stored vectors, streamed from SQLite.
    exact = faiss.IndexIDMap2(faiss.IndexFlatIP(queries.shape[1]))
    for ids, vectors in store._iter_embeddings(8192):
        exact.add_with_ids(vectors, ids)
    _, truth = exact.search(queries, 10)
    top = exact.search(queries, 10)[0]
    del exact

    results = []
    for nprobe in sorted({8, 16, default_nprobe, 64, 128}):
        ivf.nprobe = nprobe
        started = time.perf_counter()
        _, found = store._faiss.search(queries, 10)
        codes_seconds = time.perf_counter() - started
        started = time.perf_counter()
        passages = store.search(queries, 10)  # the store's path: 4k candidates re-scored on stored embeddings
        store_seconds = time.perf_counter() - started
        results.append({"nprobe": nprobe, "default": nprobe == default_nprobe,
                        "recall_at_10_codes": recall(found, truth),
                        "recall_at_10": recall([[p.id for p in row] for row in passages], truth),
                        "ms_per_query_codes": 1000 * codes_seconds / len(queries),
                        "ms_per_query": 1000 * store_seconds / len(queries)})
    ivf.nprobe = default_nprobe

    # The memory-mapped load and the in-memory one give the same results.
    in_memory, _ = read_faiss(args.work / "ivfpq" / "index.faiss", mapped=False)
    faiss.extract_index_ivf(in_memory).nprobe = default_nprobe
    same = bool(np.array_equal(in_memory.search(queries, 10)[1], store._faiss.search(queries, 10)[1]))
    return {"open_seconds": open_seconds, "rss_mib_after_mapped_open": mapped_rss,
            "mapped": store.faiss_is_mapped, "mapped_equals_in_memory": same, "recall": results,
            "synthetic_neighbour_cosine": {"top1": float(top[:, 0].mean()), "top10": float(top[:, 9].mean())},
            "real_neighbour_cosine": real_neighbour_cosines(centers)}


def recall(found, truth) -> float:
    return float(np.mean([len(set(map(int, f)) & set(map(int, t))) / len(t) for f, t in zip(found, truth)]))


def real_neighbour_cosines(centers: np.ndarray) -> dict:
    """Nearest-neighbour cosines among the real demo embeddings (each of 1000 against the others)."""
    import faiss

    index = faiss.IndexFlatIP(centers.shape[1])
    index.add(centers)
    scores, _ = index.search(centers[:1000], 11)  # the first hit is the passage itself
    return {"top1": float(scores[:, 1].mean()), "top10": float(scores[:, 10].mean())}


def run_phase(name: str, args) -> dict:
    command = [sys.executable, __file__, "--phase", name, "--passages", str(args.passages), "--factory", args.factory,
               "--work", str(args.work), "--queries", str(args.queries), "--noise", str(args.noise),
               "--demo", str(args.demo)]
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result = json.loads(output.strip().splitlines()[-1])
    print(json.dumps(result, indent=1), flush=True)
    return result


def write_report(args, build: dict, flat: dict, search: dict) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"passages": args.passages, "factory": args.factory, "dimension": 384, "queries": args.queries,
              "embeddings": f"synthetic: demo MiniLM embeddings + 1/3 of another + N(0, {args.noise}^2) noise",
              "machine": f"{os.cpu_count()} CPU cores (shared), run under nice -n 10",
              "build": build, "flat_rebuild": flat, "search": search}
    (out / "large_index.json").write_text(json.dumps(report, indent=2) + "\n")
    mib = 2**20
    default = next(r for r in search["recall"] if r["default"])
    lines = [
        f"# Large index: {args.passages:,} passages, `{args.factory}` (synthetic embeddings, real store)", "",
        "| | IVF-PQ (`" + args.factory + "`) | Flat (same SQLite, rebuilt) |", "|---|---|---|",
        f"| index.faiss | {build['faiss_bytes'] / mib:.1f} MiB | {flat['faiss_bytes'] / mib:.1f} MiB |",
        f"| FAISS build (train + add from SQLite + write) | {build['faiss_seconds']:.1f} s | "
        f"{flat['faiss_seconds']:.1f} s |",
        f"| peak RSS of the process | {build['peak_rss_mib']:.0f} MiB (whole build) | "
        f"{flat['peak_rss_mib']:.0f} MiB (rebuild) |",
        f"| recall@10 vs exact (nprobe {default['nprobe']}, the default; `IndexStore.search`) | "
        f"{default['recall_at_10']:.3f} | 1 |", "",
        f"passages.sqlite: {build['sqlite_bytes'] / mib:.0f} MiB ({build['sqlite_bytes'] / args.passages:.0f} "
        f"bytes/passage, text {build['text_bytes'] / args.passages:.0f} bytes/passage); SQLite writes "
        f"{build['sqlite_seconds']:.0f} s; peak RSS before the FAISS build {build['peak_rss_mib_before_faiss']:.0f} "
        f"MiB (interpreter + numpy + faiss alone: {build['baseline_rss_mib']:.0f} MiB).", "",
        f"Search: opened memory-mapped ({search['mapped']}) in {search['open_seconds']:.2f} s, "
        f"+{search['rss_mib_after_mapped_open']:.0f} MiB resident; same results as the in-memory load: "
        f"{search['mapped_equals_in_memory']}.", "",
        "| nprobe | recall@10, PQ codes alone | ms/query | recall@10, `IndexStore.search` (40 candidates "
        "re-scored on the stored embeddings) | ms/query |", "|---|---|---|---|---|",
        *[f"| {r['nprobe']}{' (default)' if r['default'] else ''} | {r['recall_at_10_codes']:.3f} | "
          f"{r['ms_per_query_codes']:.2f} | {r['recall_at_10']:.3f} | {r['ms_per_query']:.2f} |"
          for r in search["recall"]],
        "", f"(ms/query: a batch of {args.queries} queries on a shared 2-core machine under nice.)", "",
        f"Nearest-neighbour cosine, synthetic corpus: top-1 {search['synthetic_neighbour_cosine']['top1']:.3f}, "
        f"10th {search['synthetic_neighbour_cosine']['top10']:.3f}; real demo embeddings: top-1 "
        f"{search['real_neighbour_cosine']['top1']:.3f}, 10th {search['real_neighbour_cosine']['top10']:.3f}.",
    ]
    (out / "large_index.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=200_000)
    parser.add_argument("--factory", default="IVF1024,PQ32")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.05,
                        help="per-dimension noise around the real embeddings (0.05: the 10th neighbour as close as "
                             "among the real ones; 0.03: denser clusters, an easier search)")
    parser.add_argument("--demo", type=Path, default=DEMO_INDEX, help="an index of real MiniLM embeddings")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cepe-rag-large-index"))
    parser.add_argument("--out", default="benchmarks/results/scaling")
    parser.add_argument("--phase", choices=["build", "flat", "search"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps({"build": phase_build, "flat": phase_flat, "search": phase_search}[args.phase](args)))
        return
    build = run_phase("build", args)
    flat = run_phase("flat", args)
    search = run_phase("search", args)
    write_report(args, build, flat, search)
    shutil.rmtree(args.work / "flat", ignore_errors=True)


if __name__ == "__main__":
    main()
