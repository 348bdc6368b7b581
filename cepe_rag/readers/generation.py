"""A small batched decoding loop with streaming, stop strings, greedy and sampling decoding.

Our own loop rather than `generate()` because the CEPE model needs per-request state (cross-attention
K/V computed once) and readers need text deltas as they are produced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from cepe_rag.padding import pad_id_of, pad_token_ids


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None


# step(input_ids, attention_mask, position_ids, cache) -> logits of the last position, (batch, vocab)
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], torch.Tensor]


def positions_from_mask(mask: torch.Tensor, offset: torch.Tensor | int = 0) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0) + offset


def _next_tokens(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    if config.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / config.temperature, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        drop = sorted_probs.cumsum(-1) - sorted_probs > config.top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class StepDeltas(list):
    """One decoding step's new text per row, and which rows have ended (end of sequence or a stop string)."""

    def __init__(self, deltas: list[str], done: list[bool]):
        super().__init__(deltas)
        self.done = list(done)


def decode_stream(
    step: StepFn,
    prompts: list[list[int]],
    tokenizer,
    config: GenerationConfig,
    *,
    cache,
    position_offsets: torch.Tensor | None = None,
    past_mask: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[StepDeltas]:
    """Yield, after each decoding step, the new text of every row ("" for finished rows) as StepDeltas, whose
    `done` says which rows have ended.

    `past_mask`/`position_offsets` describe tokens already in `cache` (a shared context prefilled by a
    reader); positions of the prompt continue after them.
    """
    eos_ids = _eos_ids(tokenizer)
    ids, mask = pad_token_ids(prompts, pad_id_of(tokenizer), side="left", device=device)
    offsets = position_offsets.to(device).unsqueeze(-1) if position_offsets is not None else 0
    positions = positions_from_mask(mask, offsets)
    full_mask = mask if past_mask is None else torch.cat([past_mask.to(device), mask], dim=-1)
    generator = torch.Generator(device=device).manual_seed(config.seed) if config.seed is not None else None
    batch = len(prompts)
    generated: list[list[int]] = [[] for _ in range(batch)]
    emitted = [""] * batch
    done = [False] * batch
    for _ in range(config.max_new_tokens):
        logits = step(ids, full_mask, positions, cache)
        tokens = _next_tokens(logits, config, generator)
        deltas = [""] * batch
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if token in eos_ids:
                done[row] = True
                continue
            generated[row].append(token)
            text = tokenizer.decode(generated[row], skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                continue
            cut = _stop_index(text, config.stop_strings, len(emitted[row]))
            if cut is not None:
                text, done[row] = text[:cut], True
            deltas[row], emitted[row] = text[len(emitted[row]):], text
        yield StepDeltas(deltas, done)
        if all(done):
            break
        ids = tokens.unsqueeze(-1)
        positions = positions[:, -1:] + 1
        full_mask = torch.cat([full_mask, torch.ones((batch, 1), dtype=full_mask.dtype, device=device)], dim=-1)


def _stop_index(text: str, stops: tuple[str, ...], already: int) -> int | None:
    hits = [text.find(s, max(0, already - len(s))) for s in stops if s]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None


def _eos_ids(tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids


def generate(model, prompts: list[list[int]], tokenizer, config: GenerationConfig, *, device, cache=None,
             position_offsets: torch.Tensor | None = None, past_mask: torch.Tensor | None = None,
             **forward_kwargs) -> Iterator[list[str]]:
    """decode_stream over a transformers-style causal LM; `forward_kwargs` reach every forward call
    (e.g. `cross_context` for CEPE, `parallel_context` for the parallel reader)."""
    from transformers import DynamicCache

    def step(ids, mask, positions, step_cache):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=step_cache, use_cache=True,
                    logits_to_keep=1, **forward_kwargs)
        return out.logits[:, -1].float()

    with torch.inference_mode():
        yield from decode_stream(step, prompts, tokenizer, config, device=device,
                                 cache=cache if cache is not None else DynamicCache(config=model.config),
                                 position_offsets=position_offsets, past_mask=past_mask)
