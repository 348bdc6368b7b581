"""CEPE training on this machine's CPU, continued session after session (issue 28).

One process trains (one thread), one evaluates (the other): the trainer runs `cepe-rag train` in slices of
`--slice-minutes` (each slice resumes the run folder's checkpoint: optimiser, schedule and data order kept) and
saves an adapter after each; the evaluator scores every new adapter on the own-documents *tuning* questions
(`cepe` reader, k = 5 and 20; never the test split) and copies the best one so far, float16 cross-attention
only, to `benchmarks/results/cpu_training/adapter/`: the adapter a developer commits, and the one the next
session starts from (`--init`), so short runs add up to one long one.

Stages, each a run folder under `--runs`: `find` (an entity-swapped article picked by its invented title among
retrieved passages and its first sentence copied) for `--find-steps`, then `swap` (questions asked of
entity-swapped articles among retrieved passages) until the time is up. A session that finds a committed
adapter whose history already holds the find stage goes straight to `swap`, with a new data seed (new swaps).

    nohup python benchmarks/cpu_training.py --hours 2.5 > runs/cpu_training.log 2>&1 &

Writes, in `benchmarks/results/cpu_training/`: `scores.jsonl` (every adapter's tuning scores), `log_{run}.jsonl`
(the loss curves, copied from the run folders), `adapter/` (the best so far) and `best.json` (its scores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_ROOT = ROOT / "benchmarks" / "results" / "cpu_training"
RESULTS = RESULTS_ROOT  # a --lineage keeps its own best adapter and scores in a subfolder


def use_lineage(name: str) -> None:
    global RESULTS
    RESULTS = RESULTS_ROOT / name if name else RESULTS_ROOT
CLI = [sys.executable, "-m", "cepe_rag"]
EFFICIENTQA = ROOT.parent / "shared" / "data" / "efficientqa" / "NQ-open.efficientqa.dev.1.1.jsonl"


def one_thread(env: dict | None = None) -> dict:
    return {**(env or os.environ), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def tuning_score(summary: list[dict]) -> float:
    """Mean substring EM of the cepe reader over the evaluated k (5 and 20): the number that decides a commit."""
    rows = [r for r in summary if r["reader"].startswith("cepe")]  # cepe, or cepe-prompt<N> with --prompt-passages
    return round(sum(r["substring_em"] for r in rows) / len(rows), 2) if rows else 0.0


def dtype(args) -> str:
    """--dtype, or for auto the project's CPU default (`resolve_dtype`: bfloat16 where the CPU computes it natively,
    AMX or AVX512-BF16, else float32, which is several times faster than emulated bfloat16)."""
    from cepe_rag.models import resolve_dtype

    return str(resolve_dtype(None if args.dtype == "auto" else args.dtype, "cpu")).removeprefix("torch.")


def eval_relevance_temperature(args) -> float:
    """The tuning split is read as the adapter's card will read it, which may be sharper than training's prior."""
    return args.eval_relevance_temperature or args.relevance_temperature


def name_match_penalty(args) -> float:
    """--name-match-penalty, else the one the lineage's best was scored with: snapshots are compared read alike."""
    if args.name_match_penalty is not None:
        return args.name_match_penalty
    return (best_record() or {}).get("name_match_penalty", 0.0)


def evaluate(adapter: Path, name: str, args) -> dict:
    penalty = name_match_penalty(args)  # read from best.json once: the reading and the record must agree
    reading = ["--readers", "cepe", "--cepe-model", str(adapter), "--dtype", dtype(args),
               "--n-prompt-passages", str(args.prompt_passages),
               "--relevance-temperature", str(eval_relevance_temperature(args)),
               "--sentence-temperature", str(args.sentence_temperature),
               "--question-name-penalty", str(args.question_name_penalty),
               "--name-match-penalty", str(penalty),
               "--extractive" if args.extractive else "--no-extractive",
               "--no-cutoff",  # k passages read, whatever the default relevance cutoff: the bar is about k=20
               "--no-focus"]  # passages as trained on, and scores comparable with those before sentence focus
    out = Path(args.runs) / "eval" / name
    subprocess.run(CLI + ["eval", "--questions", args.questions, "--index", args.eval_index, "--k", args.eval_k,
                          "--out", str(out), *reading], env=one_thread(), check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    nq = {}
    if args.nq_eval:  # recorded beside the score, not deciding: the reading of real passages, on NQ-style questions
        nq_out = Path(args.runs) / "eval_nq" / name
        subprocess.run(CLI + ["eval", "--questions", args.nq_questions, "--index", args.index, "--answer-in-corpus",
                              "--limit", str(args.nq_eval), "--k", "20", "--out", str(nq_out), *reading],
                       env=one_thread(), check=True, stdout=subprocess.DEVNULL)
        nq = {"nq_tuning": [{key: row[key] for key in ("k", "n", "em", "substring_em")}
                            for row in json.loads((nq_out / "summary.json").read_text())]}
    return {"adapter": name, "score": tuning_score(summary), **nq, "n_prompt_passages": args.prompt_passages,
            "relevance_temperature": eval_relevance_temperature(args),
            **({"sentence_temperature": args.sentence_temperature} if args.sentence_temperature else {}),
            **({"question_name_penalty": args.question_name_penalty} if args.question_name_penalty else {}),
            **({"name_match_penalty": penalty} if penalty else {}),
            **({"extractive": True} if args.extractive else {}),
            "summary": summary, "time": time.strftime("%F %T")}


def best_record() -> dict | None:
    path = RESULTS / "best.json"
    return json.loads(path.read_text()) if path.exists() else None


def keep_if_better(record: dict, adapter: Path) -> bool:
    best = best_record()
    with (RESULTS / "scores.jsonl").open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    if best is not None and record["score"] <= best["score"]:
        return False
    staging = RESULTS / "adapter.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(adapter, staging)
    shutil.rmtree(RESULTS / "adapter", ignore_errors=True)
    staging.rename(RESULTS / "adapter")
    (RESULTS / "best.json").write_text(json.dumps(record, indent=2) + "\n")
    return True


def stage_plan(args) -> list[tuple[str, str | None]]:
    """(stage, init) pairs for this session: resume what the run folders hold, else start from the committed
    adapter (or from zero)."""
    committed = RESULTS / "adapter"
    if not (committed / "cepe_adapter.json").exists() and RESULTS != RESULTS_ROOT:
        committed = RESULTS_ROOT / (args.lineage_from or "") / "adapter"  # a new lineage starts from another's best
    history = []
    if (committed / "cepe_adapter.json").exists():
        history = [h["stage"] for h in json.loads((committed / "cepe_adapter.json").read_text())["training_history"]]
    init = str(committed) if history else None
    if args.stage == "qa":
        return [("qa", init)]
    if "find" in history:
        return [("swap", init)]
    return [("find", init), ("swap", None)]  # swap starts from find's model


def train_slice(stage: str, init: str | None, steps: int, args, seed: int) -> Path:
    variant = (("_gate" if args.gate else "") + (f"_p{args.prompt_passages}" if args.prompt_passages else "")
               + (f"_attn{args.attn_cof:g}" if args.attn_cof else "") + ("_ptr" if args.copy_pointer else "")
               + (f"_copy{args.copy_cof:g}" if args.copy_cof else "") + (f"_kl{args.kl_cof:g}" if args.kl_cof else "")
               + (f"_rel{args.relevance_temperature:g}" if args.relevance_temperature else "")
               + (f"_sent{args.sentence_temperature:g}" if args.sentence_temperature else "")
               + (f"_first{args.copy_first_weight:g}" if args.copy_first_weight != 1.0 else "")
               + ("_ls" if args.copy_line_starts else "") + ("_span" if args.copy_spans else "")
               + (f"_lr{args.lr:g}" if args.lr != 3e-4 else "")
               + (f"_q{args.questions_per_article}" if args.questions_per_article != 1 else "")
               + (f"_short{args.short_questions:g}" if args.short_questions else "")
               + ("_phr" if args.corpus_phrases else ""))
    out = Path(args.runs) / f"{stage}{variant}_s{seed}"
    command = CLI + ["train", "--stage", stage, "--out", str(out), "--steps", str(steps), "--batch-size", "8",
                     "--lr", str(args.lr), "--warmup-ratio", f"{args.warmup_steps / steps:.6g}",
                     "--schedule", "constant", "--index", args.index,
                     "--min-passages", "1", "--max-passages", str(args.max_passages), "--max-decoder-tokens", "48",
                     "--eval-every", "100", "--save-every", "25", "--seed", str(seed),
                     "--max-minutes", str(args.slice_minutes), "--validation", "64"]
    if dtype(args) == "bfloat16":
        command += ["--bf16"]
    if stage == "find":  # one pass: encode only the articles its steps will read
        command += ["--max-articles", str(steps * 8)]
    else:  # encoded as the steps reach them, kept in one file for every later slice and session of this encoder
        states = Path(args.runs) / f"states_{args.encoder.replace(':', '')}.safetensors"
        command += ["--lazy-states", "--states-cache", str(states)]
    if (out / "checkpoint").exists() or not init:
        command += ["--encoder", args.encoder, "--cross-attn-layers", str(args.cross_attn_layers)]
    if init:
        command += ["--init", init]
    if args.gate:
        command += ["--gate"]
    if args.prompt_passages:
        command += ["--prompt-passages", str(args.prompt_passages)]
    if args.attn_cof:
        command += ["--attn-cof", str(args.attn_cof)]
    if args.copy_pointer:
        command += ["--copy-pointer"]
    if args.copy_cof:
        command += ["--copy-cof", str(args.copy_cof)]
    if args.kl_cof:
        command += ["--kl-cof", str(args.kl_cof)]
    if args.relevance_temperature:
        command += ["--relevance-temperature", str(args.relevance_temperature)]
    if args.sentence_temperature:
        command += ["--sentence-temperature", str(args.sentence_temperature)]
    if args.copy_first_weight != 1.0:
        command += ["--copy-first-weight", str(args.copy_first_weight)]
    if args.copy_line_starts:
        command += ["--copy-line-starts"]
    if args.copy_spans:
        command += ["--copy-spans"]
    if stage == "swap" and args.questions_per_article != 1:
        command += ["--questions-per-article", str(args.questions_per_article)]
    if stage == "swap" and args.short_questions:
        command += ["--short-questions", str(args.short_questions)]
    if stage == "qa":
        for source in qa_training_questions(args):
            command += ["--questions", source]
    subprocess.run(command, env=one_thread(), check=True)
    shutil.copy(out / "log.jsonl", RESULTS / f"log_{out.name}.jsonl")
    plot_curves()
    return out


def qa_training_questions(args) -> list[str]:
    """The qa stage's questions: each --qa-questions file less its questions that score the reading for NQ (the first
    --qa-held-out whose answer is in the index's corpus: `cepe-rag eval --answer-in-corpus --limit N` on that file),
    and, with --corpus-questions and --corpus-phrases, questions generated from the training corpus."""
    from cepe_rag.eval.data import load_questions
    from cepe_rag.eval.runner import answerable_subset
    from cepe_rag.retrieval.retriever import Retriever

    sources = []
    for source in args.qa_questions or [str(EFFICIENTQA)]:
        kept = Path(args.runs) / f"qa_questions_{Path(source).stem}_less{args.qa_held_out}.jsonl"
        if not kept.exists():
            examples = load_questions(source)
            held = {q.question for q in answerable_subset(examples, Retriever(Path(args.index)))[: args.qa_held_out]}
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text("".join(json.dumps({"question": q.question, "answer": q.answers}) + "\n"
                                    for q in examples if q.question not in held))
        sources.append(str(kept))
    return sources + (["corpus"] if args.corpus_questions else []) + (["corpus-phrases"] if args.corpus_phrases else [])


def plot_curves() -> None:
    """loss_curves.png: training CE (mean of 25 steps) and validation CE of every run, against examples trained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    for path in sorted(RESULTS.glob("log_*.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        name = path.stem.removeprefix("log_")
        steps = [r["step"] * 8 for r in records]
        smooth = [sum(r["ce"] for r in records[max(0, i - 24): i + 1]) / len(records[max(0, i - 24): i + 1])
                  for i in range(len(records))]
        axis.plot(steps, smooth, label=f"{name} train")
        held = [(r["step"] * 8, r["val_ce"]) for r in records if "val_ce" in r]
        if held:
            axis.plot(*zip(*held), marker="o", linestyle="--", label=f"{name} validation")
    axis.set_xlabel("examples trained (this run)")
    axis.set_ylabel("cross-entropy per answer token")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / "loss_curves.png", dpi=110)


def argument_parser() -> argparse.ArgumentParser:
    """The run's options; the evaluator of each snapshot is started with the same ones and reads what it needs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=2.5)
    parser.add_argument("--slice-minutes", type=float, default=30)
    parser.add_argument("--find-steps", type=int, default=600)
    parser.add_argument("--swap-steps", type=int, default=100_000, help="a bound, not a plan: time ends the run")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=50,
                        help="steps to reach --lr (sessions up to the fourth used 2%% of --swap-steps: 2,000 steps, "
                             "so their lr never got past a third of --lr)")
    parser.add_argument("--encoder", default="decoder-layers:4")
    parser.add_argument("--cross-attn-layers", type=int, default=8)
    parser.add_argument("--max-passages", type=int, default=20)
    parser.add_argument("--index", default="indexes/default", help="training distractors (never the benchmark's)")
    parser.add_argument("--eval-index", default="indexes/owndocs")
    parser.add_argument("--questions", default="runs/owndocs/questions.tune.jsonl")
    parser.add_argument("--eval-k", default="5,20")
    parser.add_argument("--runs", default="runs/cpu_training")
    parser.add_argument("--gate", action="store_true", help="a zero-initialised tanh gate per cross-attention block")
    parser.add_argument("--prompt-passages", type=int, default=0,
                        help="train and evaluate with the top N passages in the prompt (cepe --n-prompt-passages N)")
    parser.add_argument("--attn-cof", type=float, default=0.0,
                        help="weight of the gold-attention loss (-log cross-attention mass on the gold passage)")
    parser.add_argument("--copy-pointer", action="store_true",
                        help="a copy pointer over the context tokens (pointer-generator), added to the init adapter")
    parser.add_argument("--copy-cof", type=float, default=0.0,
                        help="weight of the copy loss (the pointer's mass on the answer's tokens in the gold passage)")
    parser.add_argument("--kl-cof", type=float, default=0.0,
                        help="weight of distillation from the frozen decoder reading the gold passage alone")
    parser.add_argument("--copy-first-weight", type=float, default=1.0,
                        help="the copy loss's weight on each answer's first token, relative to the others")
    parser.add_argument("--copy-line-starts", action="store_true",
                        help="an --init pointer from before line-start copies learns with them")
    parser.add_argument("--copy-spans", action="store_true",
                        help="copy targets: the answer's whole occurrence in the gold passage")
    parser.add_argument("--questions-per-article", type=int, default=1,
                        help="swap: questions asked of each article, each for a different fact")
    parser.add_argument("--short-questions", type=float, default=0.0,
                        help="swap: the share of questions asked short (the subject and the words beside the answer)")
    parser.add_argument("--relevance-temperature", type=float, default=0.0,
                        help="train and evaluate under the cepe reader's relevance prior with this temperature")
    parser.add_argument("--sentence-temperature", type=float, default=0.0,
                        help="train and evaluate under the cepe reader's sentence prior with this temperature")
    parser.add_argument("--eval-relevance-temperature", type=float, default=0.0,
                        help="the relevance prior's temperature when scoring on the tuning split (default: training's)")
    parser.add_argument("--question-name-penalty", type=float, default=0.0,
                        help="scoring only: the reader's copy-pointer penalty on the question's own names")
    parser.add_argument("--name-match-penalty", type=float, default=None,
                        help="scoring only: the reader's name-match prior (not trained; default: best.json's)")
    parser.add_argument("--extractive", action="store_true",
                        help="scoring only: extractive decoding (answers are spans of the passages read)")
    parser.add_argument("--lineage", default="", help="keep this line's best adapter and scores in "
                                                      "benchmarks/results/cpu_training/<lineage>/ (it starts from the "
                                                      "main line's adapter)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="training autocast and scoring dtype (auto: bfloat16 on AMX or AVX512-BF16, else float32)")
    parser.add_argument("--stage", choices=["auto", "qa"], default="auto",
                        help="auto: find, then swap (or swap alone after find); qa: questions with retrieved passages")
    parser.add_argument("--qa-questions", action="append", default=None,
                        help="qa: a QA file, repeatable (default: EfficientQA's dev questions)")
    parser.add_argument("--qa-held-out", type=int, default=200,
                        help="qa: leave out each file's first N answer-in-corpus questions (they tune the reading)")
    parser.add_argument("--corpus-questions", action="store_true",
                        help="qa: also questions generated from the training corpus's articles (names, numbers)")
    parser.add_argument("--corpus-phrases", action="store_true",
                        help="qa: also generated questions asking for the common nouns a clause ends with")
    parser.add_argument("--nq-eval", type=int, default=0,
                        help="also score each adapter on the first N answer-in-corpus --nq-questions at k=20 "
                             "(recorded, not deciding)")
    parser.add_argument("--nq-questions", default=str(EFFICIENTQA))
    parser.add_argument("--lineage-from", default="",
                        help="a new lineage's starting adapter: this lineage's best (default: the main line's)")
    parser.add_argument("--seed", type=int, default=None, help="data seed (default: one more than the sessions "
                                                                "the committed adapter records)")
    return parser


def main() -> None:
    args = argument_parser().parse_args()
    use_lineage(args.lineage)
    RESULTS.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + 3600 * args.hours
    plan = stage_plan(args)
    committed = RESULTS / "adapter" / "cepe_adapter.json"
    sessions = len(json.loads(committed.read_text())["training_history"]) if committed.exists() else 0
    seed = args.seed if args.seed is not None else sessions
    evaluator = None
    previous = None
    for stage, init in plan:
        init = init or (str(previous / "model") if previous else None)
        steps = args.find_steps if stage == "find" else args.swap_steps
        while time.time() < deadline:
            out = train_slice(stage, init, steps, args, seed)
            done = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
            snapshot = Path(args.runs) / "snapshots" / f"{out.name}_step{done}"
            shutil.rmtree(snapshot, ignore_errors=True)
            shutil.copytree(out / "model", snapshot)
            if evaluator is not None:
                evaluator.wait()
            evaluator = subprocess.Popen([sys.executable, __file__, "--evaluate", str(snapshot), *sys.argv[1:]])
            previous = out
            if done >= steps:
                break
    if evaluator is not None:
        evaluator.wait()


def evaluate_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--evaluate", required=True)
    known, rest = parser.parse_known_args()
    args = argument_parser().parse_args(rest)
    use_lineage(args.lineage)
    adapter = Path(known.evaluate)
    record = evaluate(adapter, adapter.name, args)
    kept = keep_if_better(record, adapter)
    print(f"{adapter.name}: tuning score {record['score']}{' (best so far: kept)' if kept else ''}", flush=True)


if __name__ == "__main__":
    evaluate_main() if "--evaluate" in sys.argv else main()
