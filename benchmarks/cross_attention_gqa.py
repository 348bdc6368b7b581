"""Cross-attention at one decoding token: grouped-query SDPA against the query heads folded into the query length.

    OMP_NUM_THREADS=1 python benchmarks/cross_attention_gqa.py [--tokens 11159] [--dtype float32]

SmolLM2's shapes (9 query heads, 3 K/V heads, head size 64); prints ms per call for both and their largest
difference. `cepe/cross_attention.py` uses the folded form (no causality and no positions in cross-attention, so the
heads sharing a K/V head are just more queries of it).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=11159, help="context tokens (k=100 stored demo passages)")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    dtype, heads, kv_heads, dim = getattr(torch, args.dtype), 9, 3, 64
    torch.manual_seed(0)
    query = torch.randn(1, heads, 1, dim, dtype=dtype)
    key, value = (torch.randn(1, kv_heads, args.tokens, dim, dtype=dtype) for _ in range(2))

    def grouped():
        return F.scaled_dot_product_attention(query, key, value, enable_gqa=True)

    def folded():
        out = F.scaled_dot_product_attention(query.reshape(1, kv_heads, heads // kv_heads, dim), key, value)
        return out.reshape(1, heads, 1, dim)

    print(f"largest difference: {(grouped() - folded()).abs().max().item():.2e}")
    for name, run in (("grouped-query", grouped), ("folded", folded)):
        for _ in range(3):
            run()
        started = time.perf_counter()
        for _ in range(50):
            run()
        print(f"{name}: {(time.perf_counter() - started) / 50 * 1000:.2f} ms")


if __name__ == "__main__":
    main()
