"""Train several `cepe-rag train --stage qa` configurations side by side on one GPU, within a time budget.

A 135M decoder leaves an H100 mostly idle, so the runs share it. Each run's folder must already hold its
examples (`cepe-rag train ... --prepare-only` on any machine): the GPU machine then needs no index, no
retriever and no embedder. First every run trains a few probe steps (all at once, as they will run), which
times a step; then each run trains as many steps as fit in --minutes, its cosine schedule set to end there.
A run that still overruns stops at the budget (`--max-minutes`), validated and saved.

    python benchmarks/train_qa_gpu.py --minutes 6 --runs runs/qa_gpu/runs.json --out /tmp/qa
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def train_command(run: dict, out: Path, steps: int, minutes: float, device: str) -> list[str]:
    options = [f"--{name.replace('_', '-')}={value}" for name, value in run.get("options", {}).items()]
    return [sys.executable, "-m", "cepe_rag.cli.app", "train", "--stage", "qa", "--out", str(out),
            "--steps", str(steps), "--max-minutes", str(minutes), "--bf16", "--device", device, *options]


def launch(runs: dict[str, dict], folders: dict[str, Path], steps: dict[str, int], minutes: float,
           logs: Path, device: str) -> dict[str, float]:
    """Start every run, wait for all; the wall time of each."""
    started, processes = time.perf_counter(), {}
    for name, run in runs.items():
        log = (logs / f"{name}_{folders[name].name}.log").open("w")
        processes[name] = subprocess.Popen(train_command(run, folders[name], steps[name], minutes, device),
                                           stdout=log, stderr=subprocess.STDOUT)
    walls = {}
    for name, process in processes.items():
        if process.wait() != 0:
            raise SystemExit(f"run {name} failed: see {logs / f'{name}_{folders[name].name}.log'}")
        walls[name] = time.perf_counter() - started
    return walls


def seconds_per_step(folder: Path) -> float:
    records = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    timed = [r for r in records if "val_ce" not in r]  # validation steps are slower and rarer
    first, last = timed[len(timed) // 3], timed[-1]
    return (last["elapsed_s"] - first["elapsed_s"]) / max(1, last["step"] - first["step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True,
                        help='JSON: {name: {"examples": folder, "options": {train option: value}}}')
    parser.add_argument("--minutes", type=float, required=True, help="training time of every run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--probe-steps", type=int, default=30)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    runs = json.loads(args.runs.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    probes, finals = {}, {}
    for name, run in runs.items():
        for kind, folders in (("probe", probes), ("final", finals)):
            folder = folders[name] = args.out / name / kind
            folder.mkdir(parents=True, exist_ok=True)
            for file in Path(run["examples"]).glob("*_qa.jsonl"):
                shutil.copy(file, folder / file.name)
    walls = launch(runs, probes, {name: args.probe_steps for name in runs}, 0, args.out, args.device)
    pace = {name: seconds_per_step(folder) for name, folder in probes.items()}
    steps = {name: max(args.probe_steps, int(args.minutes * 60 / pace[name])) for name in runs}
    print(json.dumps({"probe_wall_s": walls, "seconds_per_step": pace, "steps": steps}), flush=True)
    for name in runs:  # the frozen encoder's states, computed once by the probe
        cached = probes[name] / "encoder_states.safetensors"
        if cached.exists():
            shutil.move(cached, finals[name] / cached.name)
    walls = launch(runs, finals, steps, args.minutes, args.out, args.device)
    print(json.dumps({"final_wall_s": walls}), flush=True)


if __name__ == "__main__":
    main()
