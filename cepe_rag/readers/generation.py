"""A small batched decoding loop with streaming, stop strings, greedy and sampling decoding.

Our own loop rather than `generate()` because the CEPE model needs per-request state (cross-attention
K/V computed once) and readers need text deltas as they are produced.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from cepe_rag.padding import pad_id_of, pad_token_ids
from cepe_rag.readers.extractive import SpanConstraint, constrain_logits
from cepe_rag.settings import DEFAULT_ANSWER_TOKENS


@dataclass
class GenerationConfig:
    max_new_tokens: int = DEFAULT_ANSWER_TOKENS
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None


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


class RowContext(Protocol):
    """A per-row forward argument (CEPE's cross context, the parallel reader's passage map) that follows its rows
    when a batch shrinks or grows. `pad_self`/`pad_other`: decoder-cache positions added on the left of each side."""

    def select_rows(self, rows: torch.Tensor) -> RowContext: ...

    def join(self, other: RowContext, pad_self: int, pad_other: int) -> RowContext: ...


class DecodeBatch:
    """The decoding state of a batch of rows: the decoder cache, the next input, each row's text so far.

    `step()` runs one forward pass and returns the new text per row as StepDeltas. Between steps rows may leave
    (`keep`) and prefilled rows may join (`join`): continuous batching. Rows are independent (left padding and
    masks), so a row's greedy answer does not depend on its neighbours. `limits` caps each row's new tokens
    (default: `config.max_new_tokens` for every row). `past_mask`/`position_offsets` describe tokens already in
    `cache` (a shared context prefilled by a reader); positions of the prompt continue after them. `constraints`:
    per row, None or what limits its next tokens (extractive decoding's SpanConstraint).
    """

    # Per-row state kept as lists, one entry per row: `keep` and `join` carry them with their rows.
    ROW_LISTS = ("limits", "generated", "emitted", "done", "steps", "out_of_tokens", "constraints")

    def __init__(self, model, prompts: list[list[int]], tokenizer, config: GenerationConfig, *, device, cache=None,
                 position_offsets: torch.Tensor | None = None, past_mask: torch.Tensor | None = None,
                 limits: list[int] | None = None, constraints: list[SpanConstraint | None] | None = None,
                 **forward_kwargs):
        from transformers import DynamicCache

        self.model, self.tokenizer, self.config, self.device = model, tokenizer, config, device
        self.cache = cache if cache is not None else DynamicCache(config=model.config)
        self.forward_kwargs = forward_kwargs
        self.eos_ids = _eos_ids(tokenizer)
        self.ids, mask = pad_token_ids(prompts, pad_id_of(tokenizer), side="left", device=device)
        offsets = position_offsets.to(device).unsqueeze(-1) if position_offsets is not None else 0
        self.positions = positions_from_mask(mask, offsets)
        self.mask = mask if past_mask is None else torch.cat([past_mask.to(device), mask], dim=-1)
        self.generator = (torch.Generator(device=device).manual_seed(config.seed) if config.seed is not None
                          else None)
        batch = len(prompts)
        self.limits = list(limits) if limits is not None else [config.max_new_tokens] * batch
        self.generated: list[list[int]] = [[] for _ in range(batch)]
        self.emitted = [""] * batch
        self.done = [limit <= 0 for limit in self.limits]
        self.steps = [0] * batch
        self.out_of_tokens = [False] * batch  # ended by its limit rather than by end of sequence or a stop string
        self.constraints = list(constraints) if constraints is not None else [None] * batch

    def __len__(self) -> int:
        return len(self.done)

    @torch.inference_mode()
    def step(self) -> StepDeltas:
        out = self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.positions, cache=self.cache,
                         use_cache=True, logits_to_keep=1, **self.forward_kwargs)
        logits = constrain_logits(out.logits[:, -1].float(), self.constraints, self.eos_ids)
        tokens = _next_tokens(logits, self.config, self.generator)
        deltas = [""] * len(self)
        for row, token in enumerate(tokens.tolist()):
            if self.done[row]:
                continue
            self.steps[row] += 1
            if token in self.eos_ids:
                self.done[row] = True
                continue
            if self.constraints[row] is not None:
                self.constraints[row].advance(token)
            self.generated[row].append(token)
            text = self.tokenizer.decode(self.generated[row], skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # else an incomplete UTF-8 sequence: wait for the next token
                cut = _stop_index(text, self.config.stop_strings, len(self.emitted[row]))
                if cut is not None:
                    text, self.done[row] = text[:cut], True
                deltas[row], self.emitted[row] = text[len(self.emitted[row]):], text
            if not self.done[row] and self.steps[row] >= self.limits[row]:
                self.done[row] = self.out_of_tokens[row] = True
        self.ids = tokens.unsqueeze(-1)
        self.positions = self.positions[:, -1:] + 1
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self), 1))], dim=-1)
        return StepDeltas(deltas, self.done)

    @property
    def cached_tokens(self) -> int:
        return self.mask.shape[1] - self.ids.shape[1]

    @torch.inference_mode()
    def keep(self, rows: list[int]) -> None:
        """Drop every other row (finished or abandoned), so that the next steps compute only these."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(index)
        self.ids, self.positions, self.mask = self.ids[index], self.positions[index], self.mask[index]
        self.forward_kwargs = {name: value.select_rows(index) for name, value in self.forward_kwargs.items()}
        for name in self.ROW_LISTS:
            setattr(self, name, [getattr(self, name)[row] for row in rows])

    @torch.inference_mode()
    def join(self, other: DecodeBatch) -> None:
        """Append the rows of `other`, a batch of the same model and decoding config that has taken its first step
        (its prompts are in its cache): both caches are left-padded to the longer one, the padding masked."""
        if self.ids.shape[1] != 1 or other.ids.shape[1] != 1:
            raise ValueError("only batches past their first step can join")
        length = max(self.cached_tokens, other.cached_tokens)
        pad_self, pad_other = length - self.cached_tokens, length - other.cached_tokens
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, pad_self), left_pad(theirs.keys, pad_other)])
            mine.values = torch.cat([left_pad(mine.values, pad_self), left_pad(theirs.values, pad_other)])
        self.mask = torch.cat([left_pad(self.mask, pad_self), left_pad(other.mask, pad_other)])
        self.ids = torch.cat([self.ids, other.ids])
        self.positions = torch.cat([self.positions, other.positions])
        self.forward_kwargs = {name: value.join(other.forward_kwargs[name], pad_self, pad_other)
                               for name, value in self.forward_kwargs.items()}
        for name in self.ROW_LISTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def stream(self) -> Iterator[StepDeltas]:
        """Step until every row has ended."""
        while not all(self.done):
            yield self.step()


def left_pad(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """Zeros before the sequence dimension (the last for masks, the third of four for keys and values)."""
    if count == 0:
        return tensor
    dim = 2 if tensor.dim() == 4 else -1
    shape = list(tensor.shape)
    shape[dim] = count
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


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
             **forward_kwargs) -> Iterator[StepDeltas]:
    """Decode a batch to the end; `forward_kwargs` reach every forward call (e.g. `cross_context` for CEPE,
    `parallel_context` for the parallel reader)."""
    yield from DecodeBatch(model, prompts, tokenizer, config, device=device, cache=cache,
                           position_offsets=position_offsets, past_mask=past_mask, **forward_kwargs).stream()
