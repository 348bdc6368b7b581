"""Bytes per context token that each reader would store per passage: parallel's decoder KV vs CEPE's encoder states.

    python benchmarks/state_sizes.py [--index indexes/default]

Measured on real tensors: 20 passages of the demo index through the parallel reader's prefill
(SmolLM2-135M KV cache) and through MiniLM (CEPE's encoder states), both stored in fp16.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModel, AutoTokenizer

from cepe_rag.cepe.states import ContextStates
from cepe_rag.models import embedder_path, load_decoder
from cepe_rag.readers import ParallelReader
from cepe_rag.retrieval import Retriever


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--index", default="indexes/default")
    args = parser.parse_args()
    passages = Retriever(args.index).retrieve("Who directed 2001: A Space Odyssey?", 20)
    model, tokenizer = load_decoder()
    reader = ParallelReader(model, tokenizer)
    prefix, chunks, _ = reader.pieces("q", passages)
    merged = reader.encode_passages(prefix, chunks)
    passage_tokens = sum(len(c) for c in chunks)
    kv_bytes = sum((k[:, :, len(prefix):].numel() + v[:, :, len(prefix):].numel()) * 2 for k, v in merged)

    encoder = AutoModel.from_pretrained(embedder_path()).eval()
    encoder_tokenizer = AutoTokenizer.from_pretrained(embedder_path())
    batch = encoder_tokenizer([p.as_prompt_text() for p in passages], truncation=True, max_length=256,
                              padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = encoder(**batch).last_hidden_state
    lengths = batch["attention_mask"].sum(-1).tolist()
    states = ContextStates([p.id for p in passages], [hidden[i, :n] for i, n in enumerate(lengths)])
    state_bytes = states.to(dtype=torch.float16).nbytes()
    result = {
        "passages": len(passages),
        "parallel_kv": {"tokens": passage_tokens, "bytes": kv_bytes, "bytes_per_token": kv_bytes / passage_tokens},
        "cepe_minilm_states": {"tokens": states.tokens(), "bytes": state_bytes,
                               "bytes_per_token": state_bytes / states.tokens()},
    }
    result["ratio_per_token"] = round(result["parallel_kv"]["bytes_per_token"]
                                      / result["cepe_minilm_states"]["bytes_per_token"], 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
