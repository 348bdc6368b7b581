"""Does a CEPE adapter read? Held-out answer loss with each example's own passages against the same examples
with another example's passages (same count and length, wrong facts). A reader that uses its passages has a
clearly lower loss with its own; one that answers from memory has about the same loss with either.

    python benchmarks/reading_gain.py --model runs/train/model --examples runs/train/validation_qa.jsonl
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from cepe_rag.cepe import load_cepe
from cepe_rag.padding import pad_id_of
from cepe_rag.training.examples import load_examples
from cepe_rag.training.trainer import CepeTrainingModule, collate


@torch.no_grad()
def mean_ce(module: CepeTrainingModule, examples, pad_id: int, batch_size: int = 8) -> float:
    losses = [module(collate(examples[i:i + batch_size], pad_id))[0].item()
              for i in range(0, len(examples), batch_size)]
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="CEPE adapter or checkpoint")
    parser.add_argument("--examples", type=Path, required=True, help="a validation_<stage>.jsonl of a run folder")
    parser.add_argument("--start", type=int, default=0, help="skip this many examples first")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    model = load_cepe(args.model, device="cpu").eval()
    examples = load_examples(args.examples)[args.start: args.start + args.limit]
    swapped = [replace(e, chunks=examples[(i + len(examples) // 2) % len(examples)].chunks)
               for i, e in enumerate(examples)]
    module = CepeTrainingModule(model).eval()
    pad_id = pad_id_of(model.decoder_tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
        own, other = mean_ce(module, examples, pad_id), mean_ce(module, swapped, pad_id)
    result = {"model": args.model, "examples": str(args.examples), "start": args.start, "n": len(examples),
              "ce_own_passages": own, "ce_other_passages": other, "reading_gain": other - own}
    print(json.dumps(result))
    print(f"| {args.model} | {len(examples)} | {own:.3f} | {other:.3f} | {other - own:+.3f} |")


if __name__ == "__main__":
    main()
