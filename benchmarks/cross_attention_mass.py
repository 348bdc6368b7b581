"""Diagnosis: how much of its cross-attention does a CEPE adapter put on the gold passage, as k grows?

    python benchmarks/cross_attention_mass.py --cepe-model benchmarks/results/adapters/smollm2-135m-minilm --limit 40 \\
        --out benchmarks/results/diagnosis/mass_shipped.json

For own-documents questions the gold passage (the question's own file) is placed among k - 1 retrieved
distractors (its own document left out), all through the encoder, and the decoder's prompt is read once. At the
position that predicts the first answer token, every cross-attention layer's softmax over the context tokens is
computed from its own query and keys (the model's forward pass itself is not changed). Reported per k, averaged
over questions and heads: the attention mass on the gold passage's tokens, the gold's share of the tokens (what
uniform attention would give), their ratio (how selective the layer is), and the mass on the single most
attended gold token. A reader that finds the gold passage keeps its mass as k grows; one whose mass falls like
the gold's token share is spreading its attention: a learned failure, not a masking or padding bug (those are
tested exactly in tests/cepe/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from position_probe import gold_cases  # noqa: E402

from cepe_rag.models import resolve_dtype
from cepe_rag.readers import build_reader
from cepe_rag.settings import ReaderSpec


@torch.no_grad()
def layer_weights(model, prompt_ids: list[int], context) -> list[torch.Tensor]:
    """Per cross-attention layer: (heads, context tokens) softmax weights of the last prompt position."""
    captured = {}
    layers = model.cross_attention_layers()
    hooks = [layer.cross_attn.register_forward_hook(
        lambda module, inputs, output, i=i: captured.__setitem__(i, inputs[0][:, -1:].clone()))
        for i, layer in enumerate(layers)]
    try:
        model.decoder(input_ids=torch.tensor([prompt_ids]), cross_context=context, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    weights = []
    for i, layer in enumerate(layers):
        attention = layer.cross_attn
        query = attention.q_proj(attention.layernorm(captured[i])).view(1, attention.num_heads, attention.head_dim)
        key, _ = attention.project_context(context.states)  # (1, kv heads, tokens, head_dim)
        key = key.repeat_interleave(attention.num_heads // attention.num_kv_heads, dim=1)
        scores = torch.einsum("bhd,bhtd->bht", query.float(), key.float()) * attention.head_dim ** -0.5
        weights.append(torch.softmax(scores[0], dim=-1))
    return weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", default="runs/owndocs/questions.tune.jsonl")
    parser.add_argument("--index", default="indexes/owndocs")
    parser.add_argument("--cepe-model", default=None)
    parser.add_argument("--k", default="1,5,20,50")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ks = [int(k) for k in args.k.split(",")]
    reader = build_reader(ReaderSpec(reader="cepe", cepe_model=args.cepe_model), dtype=resolve_dtype(args.dtype, "cpu"))
    model = reader.model
    cases = gold_cases(args.questions, args.index, args.limit, max(ks) + 10)
    results = []
    for k in ks:
        totals = {"gold_mass": 0.0, "gold_share": 0.0, "top_gold_token": 0.0}
        per_layer = None
        for question, gold, distractors in cases:
            passages = [gold] + distractors[: k - 1]  # order is no signal to CEPE
            prepared = reader.prepare(question.question, passages)
            states = reader._chunk_states(prepared.plan.passages)
            context = model.context_from_states([states], cross_kv="project")
            gold_tokens = states[0].shape[-2]
            total_tokens = sum(s.shape[-2] for s in states)
            weights = layer_weights(model, prepared.ids, context)
            masses = torch.stack([w[:, :gold_tokens].sum(-1).mean() for w in weights])
            per_layer = masses if per_layer is None else per_layer + masses
            totals["gold_mass"] += float(masses.mean())
            totals["gold_share"] += gold_tokens / total_tokens
            totals["top_gold_token"] += float(torch.stack([w[:, :gold_tokens].max(-1).values.mean() for w in weights])
                                              .mean())
        n = len(cases)
        row = {"k": k, "n": n, **{key: round(value / n, 4) for key, value in totals.items()},
               "gold_mass_per_layer": [round(float(m) / n, 4) for m in per_layer]}
        row["selectivity"] = round(row["gold_mass"] / row["gold_share"], 2)
        results.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cepe_model": args.cepe_model or "shipped", "dtype": args.dtype,
                                    "questions": args.questions, "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
