"""Decoder prefill time in float32 vs bfloat16 on this machine (bfloat16 pays off on CPUs with AMX).

    python benchmarks/dtype_speed.py --tokens 500,5000
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cepe_rag.models import load_decoder


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="500,5000")
    args = parser.parse_args()
    rows = []
    for dtype in ("float32", "bfloat16"):
        model, _ = load_decoder(dtype=getattr(torch, dtype))
        for n in (int(x) for x in args.tokens.split(",")):
            ids = torch.randint(100, 40_000, (1, n))
            model(ids, logits_to_keep=1)  # warm-up
            started = time.perf_counter()
            model(ids, logits_to_keep=1)
            rows.append({"dtype": dtype, "tokens": n, "prefill_s": round(time.perf_counter() - started, 3)})
    print(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
