"""Load on `cepe-rag serve`: requests/s, time to first token and latency with 1, 4 and 16 concurrent clients.

    python benchmarks/serve_load.py indexes/default [--reader parallel --k 20] [--requests 32] [--clients 1,4,16]

Starts the server on a free loopback port with the packaged models (a fresh one per level, so no level gains from
passages another level left in a reader's cache), warms it with --warmup-rounds untimed rounds of other questions
at the level's concurrency, streams greedy chat completions through the official `openai`
client, and stops the server when done. Each level sends at most --requests requests and starts none after
--max-seconds. Every answer is checked against the same question asked alone (the 1-client level, or a
request sent on an idle server): nothing lost, nothing mixed between requests (an answer equal to another
question's). Answers that differ from the answer alone are listed: in bfloat16, a batch's other matrix shapes can
round a near-tie the other way. Exit status 1 if any request failed or got another's answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai

QUESTIONS = [
    "Who directed 2001: A Space Odyssey?", "What is the capital of Australia?", "Who wrote Pride and Prejudice?",
    "When did the Berlin Wall fall?", "Who painted the Mona Lisa?", "What is the largest planet in the solar system?",
    "Who developed the theory of general relativity?", "In which country is Machu Picchu?",
    "What language is spoken in Brazil?", "Who composed the Four Seasons?", "What is the chemical symbol for gold?",
    "Who was the first person to walk on the Moon?", "Where is the Great Barrier Reef?",
    "Who wrote One Hundred Years of Solitude?", "What is the longest river in Africa?",
    "Which city hosted the 2012 Summer Olympics?",
]
# Sent before a level's timed requests, at its concurrency (never timed, never among QUESTIONS): a fresh server's
# first batches of a shape pay one-off kernel set-up that a running server does not.
WARMUP_QUESTIONS = [
    "Who invented the telephone?", "What is the tallest mountain in the world?", "Who wrote Hamlet?",
    "When did World War II end?", "What is the capital of Canada?", "Who discovered penicillin?",
    "What is the smallest prime number?", "Where is the Eiffel Tower?", "Who painted The Starry Night?",
    "What is the boiling point of water?", "Who was the first president of the United States?",
    "What is the currency of Japan?", "Which planet is known as the Red Planet?", "Who wrote War and Peace?",
    "What is the largest ocean on Earth?", "Who sculpted David?",
]


@contextmanager
def running_server(args):
    """`cepe-rag serve` in a subprocess on a free loopback port; yields its /v1 URL, stops it on exit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "cepe_rag", "serve", "--index", args.index, "--reader", args.reader,
               "--k", str(args.k), "--max-tokens", str(args.max_tokens), "--host", "127.0.0.1", "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-queue", str(max(64, args.requests)),
               "--batch-window-ms", str(args.batch_window_ms), *(["--dtype", args.dtype] if args.dtype else []),
               *(["--cross-kv-budget-mb", str(args.cross_kv_budget_mb)] if args.cross_kv_budget_mb is not None else []),
               "--no-abstain"]  # every request reads: abstentions would answer instantly and flatter the throughput
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(command, stdout=log, stderr=log,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        try:
            deadline = time.monotonic() + 600
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    sys.exit(f"the server did not start:\n{log.read().decode(errors='replace')}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()


async def ask(client: openai.AsyncOpenAI, args, question: str) -> dict:
    """One streamed request: its answer, time to first token and total time; or its error."""
    started = time.perf_counter()
    first, text = None, ""
    try:
        stream = await client.chat.completions.create(
            model=args.reader, messages=[{"role": "user", "content": question}], max_tokens=args.max_tokens,
            temperature=0, stream=True)
        async for chunk in stream:
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta:
                first = first or time.perf_counter()
                text += delta
    except openai.APIError as error:
        return {"question": question, "error": str(error)}
    done = time.perf_counter()
    return {"question": question, "text": text, "ttft_s": (first or done) - started, "total_s": done - started}


async def run_level(client, args, clients: int) -> tuple[list[dict], float]:
    """`clients` concurrent clients, each sending its next request as soon as its last one ends."""
    pending = iter(range(args.requests))
    stop_at = time.monotonic() + args.max_seconds
    results: list[dict] = []

    async def one_client():
        for i in pending:
            if time.monotonic() > stop_at:
                return
            results.append(await ask(client, args, QUESTIONS[i % len(QUESTIONS)]))

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    return results, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else float("nan")


async def benchmark(args) -> list[dict]:
    alone: dict[str, str] = {}  # question -> its answer on an otherwise idle server
    rows = []
    for clients in sorted(int(c) for c in args.clients.split(",")):
        with running_server(args) as base_url:
            client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
            for _ in range(args.warmup_rounds):
                await asyncio.gather(*(ask(client, args, WARMUP_QUESTIONS[i % len(WARMUP_QUESTIONS)])
                                       for i in range(clients)))
            results, seconds = await run_level(client, args, clients)
            if clients == 1:
                alone.update((r["question"], r["text"]) for r in results if "text" in r)
            for r in results:  # questions the 1-client level did not ask: ask them alone now
                if "text" in r and r["question"] not in alone:
                    alone[r["question"]] = (await ask(client, args, r["question"])).get("text")
            await client.close()
        ok = [r for r in results if "text" in r]
        differing = [r for r in ok if r["text"] != alone[r["question"]]]
        rows.append({
            "clients": clients, "requests": len(results), "failed": len(results) - len(ok),
            "differ_from_alone": len(differing),
            # Another request's answer: a mix-up between rows (a numerically different answer is not one).
            "mixed": sum(r["text"] in {a for q, a in alone.items() if q != r["question"]} for r in differing),
            "differences": [{"question": r["question"], "alone": alone[r["question"]], "here": r["text"]}
                            for r in differing],
            "seconds": round(seconds, 2), "requests_per_s": round(len(ok) / seconds, 3),
            "ttft_p50_s": round(percentile([r["ttft_s"] for r in ok], 0.5), 3),
            "ttft_p95_s": round(percentile([r["ttft_s"] for r in ok], 0.95), 3),
            "latency_p50_s": round(percentile([r["total_s"] for r in ok], 0.5), 3),
            "latency_p95_s": round(percentile([r["total_s"] for r in ok], 0.95), 3),
            "errors": sorted({r["error"] for r in results if "error" in r})[:3],
        })
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    base = rows[0]["requests_per_s"] if rows and rows[0]["clients"] == 1 else None
    for row in rows:
        row["throughput_vs_1_client"] = round(row["requests_per_s"] / base, 2) if base else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index", help="Index folder (built with `cepe-rag index`).")
    parser.add_argument("--reader", default="parallel", help="concat, parallel, cepe or closed-book.")
    parser.add_argument("--k", type=int, default=20, help="Passages retrieved per question.")
    parser.add_argument("--clients", default="1,4,16", help="Comma-separated concurrency levels.")
    parser.add_argument("--requests", type=int, default=32, help="Requests per level.")
    parser.add_argument("--max-seconds", type=float, default=600, help="No new request after this long, per level.")
    parser.add_argument("--max-tokens", type=int, default=32, help="Answer length limit.")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--dtype", help="The server's --dtype (default: the server's own default).")
    parser.add_argument("--cross-kv-budget-mb", type=float,
                        help="cepe: the server's --cross-kv-budget-mb (0: K/V always absorbed, never cached).")
    parser.add_argument("--warmup-rounds", type=int, default=1,
                        help="Untimed rounds of `clients` concurrent requests (other questions) before each level.")
    parser.add_argument("--batch-window-ms", type=float, default=5.0)
    parser.add_argument("--out", type=Path, help="Also write the JSON here.")
    args = parser.parse_args()
    if not Path(args.index, "manifest.json").exists():
        sys.exit(f"no index at {args.index}: build one with `cepe-rag index --demo --index {args.index}`")
    rows = asyncio.run(benchmark(args))
    result = {"reader": args.reader, "k": args.k, "max_tokens": args.max_tokens, "cpus": os.cpu_count(),
              "warmup_rounds": args.warmup_rounds, "dtype": args.dtype or "default",
              "levels": rows}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.reader}, k={args.k}, <= {args.max_tokens} tokens per answer\n")
    print("| clients | requests | failed | mixed | differ from alone | requests/s | vs 1 client "
          "| first token p50 / p95 (s) | latency p50 / p95 (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['failed']} | {r['mixed']} | {r['differ_from_alone']} | "
              f"{r['requests_per_s']} | {r['throughput_vs_1_client']} | {r['ttft_p50_s']} / {r['ttft_p95_s']} | "
              f"{r['latency_p50_s']} / {r['latency_p95_s']} |")
    for r in rows:
        for d in r["differences"]:
            print(f"{r['clients']} clients: {d['question']!r}: alone {d['alone']!r}, here {d['here']!r}")
    sys.exit(1 if any(r["failed"] or r["mixed"] for r in rows) else 0)


if __name__ == "__main__":
    main()
