"""Decode speed of the CEPE model: cross-attention K/V cached per request vs absorbed (never formed).

    python benchmarks/cepe_decode.py [--passages 0,10,100,1000] [--out benchmarks/results/cepe_decode.json]

Decoder: SmolLM2-135M-Instruct (the packaged default). Context: random encoder states of a MiniLM-sized
encoder (384-d), 128 tokens per passage; cross-attention weights random (speed does not depend on them).
Also measured: the plain decoder with the same number of tokens already in its own KV cache (random
keys/values; prefilling 128K tokens through the decoder would take hours here and changes nothing).
All figures come from one run on one machine, so their ratios are comparable.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, DynamicCache

from cepe_rag.cepe import CepeForCausalLM
from cepe_rag.models import load_decoder

PASSAGE_TOKENS = 128
PROMPT_TOKENS = 32


def time_decode(model, context, steps: int, cache_tokens: int = 0) -> float:
    """Median milliseconds per decoded token after a prefill of PROMPT_TOKENS (and optional filled cache)."""
    config = model.config
    cache = DynamicCache(config=config)
    if cache_tokens:
        shape = (1, config.num_key_value_heads, cache_tokens, config.head_dim)
        for layer in range(config.num_hidden_layers):
            cache.update(torch.randn(shape), torch.randn(shape), layer)
    ids = torch.randint(0, config.vocab_size, (1, PROMPT_TOKENS))
    position = cache_tokens
    times = []
    with torch.inference_mode():
        for step in range(steps + 1):
            positions = torch.arange(position, position + ids.shape[1])[None]
            started = time.perf_counter()
            out = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1,
                        **({"cross_context": context} if context is not None else {}))
            elapsed = time.perf_counter() - started
            if step > 0:  # step 0 is the prefill (and, if cached, the one-time K/V projection)
                times.append(elapsed)
            position += ids.shape[1]
            ids = out.logits[:, -1].argmax(-1, keepdim=True)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--passages", default="0,10,100,1000")
    parser.add_argument("--cross-layers", type=int, default=30, help="decoder layers with cross-attention")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cepe_decode.json"))
    args = parser.parse_args()
    torch.manual_seed(0)

    decoder, _ = load_decoder(dtype=torch.float32)  # the figures below are float32
    encoder = BertModel(BertConfig(hidden_size=384, num_hidden_layers=1, num_attention_heads=12,
                                   intermediate_size=1536)).eval()
    model = CepeForCausalLM(decoder, encoder, num_cross_attn_layers=args.cross_layers, init_mode="copy").eval()
    config = model.config
    decoder_kv_bytes_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4
    cross_kv_bytes_per_token = 2 * args.cross_layers * config.num_key_value_heads * config.head_dim * 4
    state_bytes_per_token = encoder.config.hidden_size * 4

    rows = []
    for n in [int(x) for x in args.passages.split(",")]:
        tokens = n * PASSAGE_TOKENS
        row = {"passages": n, "context_tokens": tokens}
        if n == 0:
            row["no_context_ms"] = time_decode(model, None, args.steps)
            rows.append(row)
            print(row, flush=True)
            continue
        chunks = [[torch.randn(PASSAGE_TOKENS, 384) for _ in range(n)]]
        for mode, key in (("cache", "cached"), ("absorb", "absorbed")):
            context = model.context_from_states(chunks, cross_kv=mode)
            row[f"{key}_ms"] = time_decode(model, context, args.steps)
            row[f"{key}_held_mib"] = round((context.states.numel() * 4 + context.kv_bytes()) / 2**20, 1)
            del context
        row["plain_decoder_same_tokens_in_kv_ms"] = time_decode(model, None, args.steps, cache_tokens=tokens)
        row["plain_decoder_kv_mib"] = round(tokens * decoder_kv_bytes_per_token / 2**20, 1)
        row["absorbed_over_cached"] = round(row["absorbed_ms"] / row["cached_ms"], 2)
        rows.append(row)
        print(row, flush=True)

    base = rows[0].get("no_context_ms") if rows and "no_context_ms" in rows[0] else None
    for row in rows:
        if base and "cached_ms" in row:
            row["cached_over_no_context"] = round(row["cached_ms"] / base, 2)
            plain = row["plain_decoder_same_tokens_in_kv_ms"]
            row["cached_over_plain_same_tokens"] = round(row["cached_ms"] / plain, 2)
    result = {
        "decoder": "SmolLM2-135M-Instruct", "encoder_hidden": 384, "cross_attn_layers": args.cross_layers,
        "dtype": "float32", "passage_tokens": PASSAGE_TOKENS,
        "bytes_per_context_token": {"cross_kv_cached": cross_kv_bytes_per_token,
                                    "encoder_states": state_bytes_per_token,
                                    "decoder_kv": decoder_kv_bytes_per_token},
        "rows": rows,
        "environment": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print("\n| passages | context tokens | cached ms/tok | absorbed ms/tok | absorbed/cached | plain decoder, same "
          "tokens in KV, ms/tok | held: cached MiB | held: absorbed MiB | plain KV MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "cached_ms" not in row:
            print(f"| 0 | 0 | {row['no_context_ms']:.1f} (no context) | | | | | | |")
            continue
        print(f"| {row['passages']} | {row['context_tokens']} | {row['cached_ms']:.1f} | {row['absorbed_ms']:.1f} | "
              f"{row['absorbed_over_cached']}x | {row['plain_decoder_same_tokens_in_kv_ms']:.1f} | "
              f"{row['cached_held_mib']} | {row['absorbed_held_mib']} | {row['plain_decoder_kv_mib']} |")


if __name__ == "__main__":
    main()
