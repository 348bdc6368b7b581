"""Time to first token in `cepe-rag chat`, question after question: the models load once, so from the second
question on only retrieval, the prompt's prefill and one decoding step stand between the question and its answer.

Runs the real command with piped questions (one per line) over an index and reads each answer's timing line
("first token X s": from the question to its first token, retrieval included).

    python benchmarks/chat_latency.py --index indexes/default --out benchmarks/results/chat_latency
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUESTIONS = ["Who directed 2001: A Space Odyssey?", "When was the film released?", "Who wrote the novel Dracula?",
             "What is the capital of Australia?", "Who painted the Mona Lisa?", "Where is the Eiffel Tower?",
             "Who developed the theory of general relativity?", "What is the largest planet in the Solar System?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="indexes/default")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--extra", default="", help="more chat options, e.g. '--dtype float32'")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/chat_latency"))
    args = parser.parse_args()
    command = [sys.executable, "-m", "cepe_rag", "chat", "--index", args.index, "--k", str(args.k), *args.extra.split()]
    started = time.perf_counter()
    result = subprocess.run(command, input="\n".join(QUESTIONS) + "\n", capture_output=True, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(result.stderr)
    first = [float(x) for x in re.findall(r"first token ([\d.]+) s", result.stderr)]
    reads = re.findall(r"read (\d+) of (\d+) passages", result.stderr)
    if len(first) != len(QUESTIONS):
        sys.exit(f"expected {len(QUESTIONS)} timing lines, found {len(first)}:\n{result.stderr}")
    later = first[1:]
    summary = {"command": " ".join(command[1:]), "questions": QUESTIONS, "first_token_s": first,
               "passages_read": [int(r[0]) for r in reads], "first_question_s": first[0],
               "later_median_s": round(statistics.median(later), 2), "later_max_s": max(later),
               "wall_s_including_load": round(wall, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chat_latency.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = ["| question | first token (s) | passages read |", "|---|---|---|"]
    table += [f"| {q} | {t:.2f} | {r} |" for q, t, r in zip(QUESTIONS, first, summary["passages_read"] + [""] * 9)]
    table.append(f"| **2nd and later: median / max** | **{summary['later_median_s']:.2f} / "
                 f"{summary['later_max_s']:.2f}** | |")
    (args.out / "chat_latency.md").write_text("\n".join(table) + "\n")
    print(json.dumps(summary, indent=2))
    print("\n".join(table))


if __name__ == "__main__":
    main()
