"""Held-out "reading with distractors" loss: the frozen decoder closed-book, with the passages in its prompt
(concat, CEPED's teacher), and a CEPE checkpoint reading them through cross-attention.

    python benchmarks/read_validation.py --examples runs/train/read/validation_read.jsonl \
        --cepe-model benchmarks/results/adapters/smollm2-135m-minilm

Cross-entropy per answer token (nats) on examples built from held-out articles only; lower is better.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from cepe_rag.cepe import load_cepe
from cepe_rag.models import load_decoder
from cepe_rag.padding import pad_id_of
from cepe_rag.readers import ClosedBookReader
from cepe_rag.readers.base import passage_block
from cepe_rag.training.examples import load_examples
from cepe_rag.training.trainer import CepeTrainingModule, collate


def answer_ce(model, prompt: list[int], target: list[int]) -> float:
    ids = torch.tensor([prompt + target])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
    return F.cross_entropy(logits, torch.tensor(target), reduction="sum").item()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=Path, required=True)
    parser.add_argument("--cepe-model", action="append", default=[], help="repeatable")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    examples = load_examples(args.examples)
    tokens = sum(len(e.target_ids) for e in examples)
    decoder, tokenizer = load_decoder()
    prompts = ClosedBookReader(decoder, tokenizer)
    result = {
        "examples": len(examples), "answer_tokens": tokens,
        "closed-book": sum(answer_ce(decoder, e.prompt_ids, e.target_ids) for e in examples) / tokens,
        "concat": sum(answer_ce(decoder, prompts.chat_ids("".join(passage_block(c) for c in e.chunks) + e.question),
                                e.target_ids) for e in examples) / tokens,
    }
    for path in args.cepe_model:
        module = CepeTrainingModule(load_cepe(path)).eval()
        # One example per batch: the module's CE is then that example's token mean.
        result[f"cepe {path}"] = sum(module(collate([e], pad_id_of(tokenizer)))[0].item() * len(e.target_ids)
                                     for e in examples) / tokens
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
