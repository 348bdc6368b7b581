"""Run questions through retrieval and readers for several k; cached and resumable per run folder.

Layout of a run folder:
  retrieval.jsonl                 top-max(k) passage ids, scores and dense similarities per question (computed once)
  predictions/{reader}_k{k}.jsonl one line per answered question, appended as it goes (resume = skip done ids)
  summary.json, summary.md        metrics per reader and k
  accuracy_vs_k.png               substring EM and retrieval recall vs k
  run.json                        the index (path, content version) and each reader's settings; a resumed run
                                  with other ones is refused, so one folder never mixes two configurations
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from cepe_rag.eval.data import QAExample
from cepe_rag.eval.metrics import (
    answer_in_passages,
    exact_match,
    normalize_answer,
    postprocess,
    substring_match,
    token_f1,
)
from cepe_rag.files import atomic_write
from cepe_rag.pipelines.session import RagSession
from cepe_rag.retrieval import Retriever
from cepe_rag.types import CepeRagError, Passage

SETTINGS_FILE = "run.json"


def answerable_subset(questions: list[QAExample], retriever: Retriever) -> list[QAExample]:
    """Questions with a gold answer string somewhere in the indexed corpus."""
    corpus = "\n".join(normalize_answer(text) for text in retriever.store.passage_texts())
    return [q for q in questions if any(normalize_answer(a) and normalize_answer(a) in corpus for a in q.answers)]


def cached_retrieval(questions: list[QAExample], retriever: Retriever, k: int, path: Path) -> dict[str, list]:
    """{question id: [(passage id, score, dense similarity), ...]} for the top k, read from `path` or computed and
    saved. The dense similarity is what the relevance cutoff and the cepe reader's relevance prior read; a record
    without it (written before it was kept) is retrieved again."""
    cached: dict[str, list] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption: recomputed below
            hits = record["hits"]
            if len(hits) >= min(k, retriever.store.count()) and all(len(hit) == 3 for hit in hits):
                cached[record["id"]] = hits
    todo = [q for q in questions if q.id not in cached]
    with _append(path) as handle:
        for start in range(0, len(todo), 256):
            batch = todo[start:start + 256]
            for question, passages in zip(batch, retriever.retrieve_batch([q.question for q in batch], k)):
                cached[question.id] = [(p.id, p.score, p.dense_score) for p in passages]
                handle.write(json.dumps({"id": question.id, "hits": cached[question.id]}) + "\n")
    return cached


def run_eval(questions: list[QAExample], session: RagSession, ks: list[int], out_dir: str | Path, *,
             progress: Callable[[str, int, int], None] | None = None, settings: dict[str, dict] | None = None
             ) -> list[dict]:
    """Every reader of the session at every k, each question answered through `RagSession.answer` with its cached
    top-k as the caller's own passages (read as they are: a harness measures readers, so it never abstains).
    settings: per reader name, whatever determines its answers (decoder, dtype, knobs), kept in run.json."""
    retriever, readers = session.retriever, session.readers
    out = Path(out_dir)
    if not questions:
        raise CepeRagError("no questions to evaluate")
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    guard_settings(out, retriever, settings or {})
    hits = cached_retrieval(questions, retriever, max(ks), out / "retrieval.jsonl")
    texts = retriever.store.passages(sorted({hit[0] for h in hits.values() for hit in h}))
    rows = []
    for reader_name, reader in readers.items():
        for k in ks if reader.reads_passages else [0]:
            path = out / "predictions" / f"{reader_name}_k{k}.jsonl"
            done = read_predictions(path)
            with _append(path) as handle:
                for index, question in enumerate(questions):
                    if progress:
                        progress(f"{reader_name} k={k}", index, len(questions))
                    if question.id in done:
                        continue
                    passages = [replace(texts[pid], score=score, dense_score=dense)
                                for pid, score, dense in hits[question.id][:k] if pid in texts]
                    record = _answer_one(session, reader_name, question, passages, k)
                    done[question.id] = record
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    handle.flush()
            rows.append(_summarise(reader_name, k, [done[q.id] for q in questions]))
    write_reports(rows + _earlier_rows(out, questions, {(r["reader"], r["k"]) for r in rows}), out)
    return rows


def guard_settings(out: Path, retriever: Retriever, settings: dict[str, dict]) -> None:
    """Refuse to resume a run folder with other settings: its cached retrieval and answers would be mixed with
    new ones made differently, and its summary would silently average the two."""
    path = out / SETTINGS_FILE
    store = retriever.store
    retrieval = {"index": str(store.folder.resolve()), "content_version": store.content_version(),
                 "passages": store.count(), "mode": retriever.mode}
    if retriever.filters:
        retrieval["filters"] = asdict(retriever.filters)
    recorded = {"retrieval": retrieval, "readers": {}}
    if path.exists():
        try:
            recorded = json.loads(path.read_text())
            recorded_retrieval, recorded_readers = recorded["retrieval"], recorded["readers"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CepeRagError(f"{path} is not a run settings file: use another --out") from None
        if {"mode": "dense", **recorded_retrieval} != retrieval:  # folders from before hybrid search were dense
            raise CepeRagError(f"{out} was retrieved from {_describe(recorded_retrieval)}, not {_describe(retrieval)}: "
                               "use another --out")
        for name, options in settings.items():
            if name in recorded_readers and recorded_readers[name] != options:
                changed = ", ".join(f"{key} {recorded_readers[name].get(key)!r} -> {options.get(key)!r}"
                                    for key in sorted(set(options) | set(recorded_readers[name]))
                                    if recorded_readers[name].get(key) != options.get(key))
                raise CepeRagError(f"{out} holds {name} answers made with other settings ({changed}): "
                                   "use another --out")
    recorded["readers"].update(settings)
    atomic_write(path, (json.dumps(recorded, indent=2) + "\n").encode())


def _describe(retrieval: dict) -> str:
    filters = f", filters {retrieval['filters']}" if retrieval.get("filters") else ""
    return (f"{retrieval['index']} (version {retrieval['content_version']}, {retrieval['passages']} passages, "
            f"{retrieval.get('mode', 'dense')} retrieval{filters})")


def summarise_folder(questions: list[QAExample], out_dir: str | Path) -> list[dict]:
    """Summary, table and plot of every prediction file in a run folder, answering nothing."""
    out = Path(out_dir)
    rows = _earlier_rows(out, questions, set())
    if not rows:
        raise CepeRagError(f"no predictions for these questions in {out / 'predictions'}")
    write_reports(rows, out)
    return rows


def _earlier_rows(out: Path, questions: list[QAExample], skip: set[tuple[str, int]]) -> list[dict]:
    """Rows for predictions that earlier runs left in the folder (other readers or k), on the same questions,
    so that one summary covers the whole run folder; a partial file gives a row with its smaller n."""
    rows = []
    for path in sorted((out / "predictions").glob("*_k*.jsonl")):
        done = read_predictions(path)
        records = [done[q.id] for q in questions if q.id in done]
        if not records:
            continue
        # Records say which reader and k made them; folders from before that are named by them.
        named_reader, _, named_k = path.stem.rpartition("_k")
        reader, k = records[0].get("reader", named_reader), records[0].get("k", named_k)
        if str(k).isdigit() and (reader, int(k)) not in skip:
            rows.append(_summarise(reader, int(k), records))
    return sorted(rows, key=lambda row: (row["reader"], row["k"]))


def _answer_one(session: RagSession, reader_name: str, question: QAExample, passages: list[Passage], k: int
                ) -> dict:
    started = time.perf_counter()
    answer = session.answer(question.question, reader=reader_name, passages=passages)
    latency = time.perf_counter() - started
    prediction = postprocess(answer.text)
    return {
        "id": question.id, "reader": reader_name, "k": k, "question": question.question, "answers": question.answers,
        "raw": answer.text, "prediction": prediction,
        "em": exact_match(prediction, question.answers), "substring_em": substring_match(prediction, question.answers),
        "f1": token_f1(prediction, question.answers),
        "recall": float(answer_in_passages([f"{p.title} {p.text}" for p in passages], question.answers)) if k else 0.0,
        "passages_read": answer.usage.get("passages_read", 0), "prompt_tokens": answer.usage.get("prompt_tokens", 0),
        "decode_steps": answer.usage.get("decode_steps", 0), "latency_s": latency,
        "first_token_s": answer.timings.get("first_token_s", 0.0),
    }


def _append(path: Path):
    """Open a JSONL file for appending, first ending a last line that an interruption cut short, so the next
    record is not glued to it."""
    cut = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    handle = path.open("a")
    if cut:
        handle.write("\n")
    return handle


def read_predictions(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                done[record["id"]] = record
            except (json.JSONDecodeError, KeyError):
                continue  # the line an interruption cut short: that question is answered again
    return done


def _summarise(reader: str, k: int, records: list[dict]) -> dict:
    n = len(records)

    def mean(key):
        return sum(r[key] for r in records) / n if n else 0.0

    latency = sum(r["latency_s"] for r in records)
    return {
        "reader": reader, "k": k, "n": n,
        "em": round(100 * mean("em"), 1), "substring_em": round(100 * mean("substring_em"), 1),
        "f1": round(100 * mean("f1"), 1), "recall_at_k": round(100 * mean("recall"), 1),
        # fewer than k where the relevance cutoff dropped some
        "passages_read": round(sum(r.get("passages_read", 0) for r in records) / n, 2) if n else 0.0,
        "latency_s": round(latency / n, 2) if n else 0.0,
        "tokens_per_s": round(sum(r["decode_steps"] for r in records) / latency, 1) if latency else 0.0,
        "reader_efficiency": round(mean("substring_em") / mean("recall"), 2) if mean("recall") else None,
    }


def write_reports(rows: list[dict], out: Path) -> None:
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    lines = ["| reader | k | n | EM | substring EM | F1 | recall@k | passages read | s/question | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['reader']} | {r['k']} | {r['n']} | {r['em']} | {r['substring_em']} | {r['f1']} | "
                     f"{r['recall_at_k'] if r['k'] else '–'} | {r.get('passages_read', '')} | {r['latency_s']} | "
                     f"{r['tokens_per_s']} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "accuracy_vs_k.png")


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # plotting is optional (the dev extra installs matplotlib)
    figure, axis = plt.subplots(figsize=(6, 4))
    for reader in dict.fromkeys(r["reader"] for r in rows):
        points = sorted((r["k"], r["substring_em"]) for r in rows if r["reader"] == reader)
        if points[0][0] == 0:  # a reader without passages: one value for every k
            axis.axhline(points[0][1], linestyle=":", label=f"{reader}", color="gray")
        else:
            axis.plot(*zip(*points), marker="o", label=reader)
    # One recall per k, from the row with the most questions (rows of a partial run may have fewer).
    best = {}
    for r in rows:
        if r["k"] and r["n"] >= best.get(r["k"], {"n": -1})["n"]:
            best[r["k"]] = r
    recall = sorted((k, r["recall_at_k"]) for k, r in best.items())
    if recall:
        axis.plot(*zip(*recall), linestyle="--", color="black", label="retrieval recall@k")
    axis.set_xscale("log")
    axis.set_xlabel("retrieved passages k")
    axis.set_ylabel("%")
    axis.set_title("Substring EM vs k")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
