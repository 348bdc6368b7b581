"""Diagnosis of a copy-pointer adapter: where does the right answer get lost, in the pointer's attention or its gate?

    python benchmarks/pointer_diagnosis.py --cepe-model benchmarks/results/cpu_training/pointer/adapter --k 1,5 \\
        --relevance-temperature 0.02 --limit 40 --out benchmarks/results/diagnosis/pointer_s9_step255.json

For own-documents tuning questions the gold passage (the question's own file) is placed among k - 1 retrieved
distractors (its own document left out), all through the encoder, as the cepe reader reads them (with its relevance
prior if asked). The gold answer is then teacher-forced after the reader's prompt. At every answer token, and at the
first one on its own, reported as means over questions:

- gate: the pointer's share g of the mixture p = (1 - g) p_decoder + g p_copy;
- copy_mass: the pointer's attention on context tokens equal to the target token (p_copy(target));
- copy_mass_gold: the same, counting only the gold passage's tokens;
- decoder_p: the decoder's own probability of the target (cross-attention included, pointer left out);
- mixture_p: the model's probability of the target;
- first_token_right: how often the model's most likely first token is the answer's; first_copy_right,
  first_decoder_right: the same for the pointer's and the decoder's own most likely first token;
  first_in_context_right: the model's most likely first token among the tokens of its passages (extractive).

A pointer that finds the answer (copy_mass high) behind a shut gate needs its gate; one whose attention misses it
needs its attention trained.
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
from cepe_rag.readers.generation import GenerationConfig
from cepe_rag.settings import ReaderSpec


@torch.no_grad()
def answer_statistics(reader, question: str, passages, answer: str, gold_passages: int) -> dict:
    model = reader.model
    prepared = reader.prepare(question, passages)
    context = reader.start([prepared], GenerationConfig(max_new_tokens=1)).forward_kwargs["cross_context"]
    target = model.decoder_tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prepared.ids + target])
    hidden = model.decoder.base_model(input_ids=ids, cross_context=context, use_cache=False).last_hidden_state
    positions = slice(len(prepared.ids) - 1, ids.shape[1] - 1)  # the positions that predict the answer's tokens
    hidden = hidden[:, positions]
    logits = model.decoder.get_output_embeddings()(hidden).float()
    embeds = model.decoder.get_input_embeddings()(ids[:, positions])
    pointer = model.pointer
    attention = pointer.attention(hidden, embeds, context.pointer_keys(pointer), context.mask,
                                  context.pointer_prior())[0]
    gate = torch.sigmoid(pointer.gate(hidden.to(pointer.gate.weight.dtype)).float())[0, :, 0]
    copied_as = model.copy_token_ids(context.token_ids[:, None].expand(-1, len(target), -1), ids[:, positions])
    mixed = pointer.mix(logits, hidden, attention[None], copied_as, context.mask.any(-1))[0].exp()
    targets = torch.tensor(target)
    hits = copied_as[0] == targets[:, None]  # (answer tokens, context tokens)
    gold = torch.zeros_like(hits[0])
    gold[:gold_passages] = True
    copy_mass = (attention.float() * hits).sum(-1)
    copy_mass_gold = (attention.float() * (hits & gold)).sum(-1)
    decoder_p = logits.softmax(-1)[0, torch.arange(len(target)), targets]
    mixture_p = mixed[torch.arange(len(target)), targets]
    per_token = {"gate": gate, "copy_mass": copy_mass, "copy_mass_gold": copy_mass_gold, "decoder_p": decoder_p,
                 "mixture_p": mixture_p}
    row = {name: float(values.mean()) for name, values in per_token.items()}
    row.update({f"first_{name}": float(values[0]) for name, values in per_token.items()})
    row["first_token_right"] = float(int(mixed[0].argmax()) == target[0])
    copy_by_token = torch.zeros_like(mixed[0]).scatter_add_(0, copied_as[0, 0], attention[0].float())
    in_context = torch.zeros_like(mixed[0], dtype=torch.bool)
    in_context[copied_as[0, 0][context.mask[0]]] = True
    row["first_copy_right"] = float(int(copy_by_token.argmax()) == target[0])
    row["first_decoder_right"] = float(int(logits[0, 0].argmax()) == target[0])
    row["first_in_context_right"] = float(int(mixed[0].masked_fill(~in_context, 0).argmax()) == target[0])
    row["first_copy_top_token"] = model.decoder_tokenizer.decode([int(copied_as[0, 0][attention[0].argmax()])])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", default="runs/owndocs/questions.tune.jsonl")
    parser.add_argument("--index", default="indexes/owndocs")
    parser.add_argument("--cepe-model", required=True)
    parser.add_argument("--k", default="1,5")
    parser.add_argument("--relevance-temperature", type=float, default=0.0)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    reader = build_reader(ReaderSpec(reader="cepe", cepe_model=args.cepe_model, read_margin=None, focus=False,
                                     relevance_temperature=args.relevance_temperature),
                          dtype=resolve_dtype(args.dtype, "cpu"))
    if reader.model.pointer is None:
        raise SystemExit(f"error: {args.cepe_model} has no copy pointer")
    ks = [int(k) for k in args.k.split(",")]
    cases = gold_cases(args.questions, args.index, args.limit, max(ks) + 10)
    results = []
    for k in ks:
        rows = []
        for question, gold, distractors in cases:
            passages = [gold] + distractors[: k - 1]  # order is no signal to CEPE
            gold_tokens = len(reader.model.tokenize_chunks([gold.as_prompt_text()])[0])
            rows.append(answer_statistics(reader, question.question, passages, question.answers[0], gold_tokens))
        summary = {"k": k, "n": len(rows), **{name: round(sum(r[name] for r in rows) / len(rows), 4)
                                               for name in rows[0] if name != "first_copy_top_token"},
                   "first_copy_top_tokens": [r["first_copy_top_token"] for r in rows[:12]]}
        results.append(summary)
        print(json.dumps(summary), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cepe_model": args.cepe_model, "relevance_temperature": args.relevance_temperature,
                                    "dtype": args.dtype, "questions": args.questions, "rows": results}, indent=2)
                        + "\n")


if __name__ == "__main__":
    main()
