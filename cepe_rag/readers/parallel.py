"""Training-free parallel encoding with the decoder itself (Parallel Context Windows / APE style).

Each passage is prefilled on its own, all in one batch, after a shared prefix (the chat template's
system turn and the start of the user turn) and with the same position range. The question and the
answer then attend to the prefix plus the concatenation of every passage's KV cache. APE's two knobs
act on attention to passage tokens: a temperature on their logits, and a scale on their log-sum-exp
(the share of attention the passages get as a block).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from cepe_rag.readers.base import NO_CONVERSATION, PreparedPrompt, Reader
from cepe_rag.readers.generation import DecodeBatch, GenerationConfig, left_pad
from cepe_rag.settings import APE_SCALE, APE_TEMPERATURE
from cepe_rag.types import Conversation, Passage

ATTENTION_NAME = "cepe_parallel"


@dataclass
class ParallelContext:
    """Which cached key positions are passage tokens, and how attention to them is adjusted."""

    is_passage: torch.Tensor  # (batch, cached tokens) bool
    temperature: float = 1.0
    lse_scale: float = 1.0

    def select_rows(self, rows: torch.Tensor) -> ParallelContext:
        return ParallelContext(self.is_passage[rows], self.temperature, self.lse_scale)

    def join(self, other: ParallelContext, pad_self: int, pad_other: int) -> ParallelContext:
        """Rows of both; each side's map shifted right by the padding its cache got on the left."""
        mine, theirs = left_pad(self.is_passage, pad_self), left_pad(other.is_passage, pad_other)
        width = max(mine.shape[1], theirs.shape[1])  # a map may stop short of the tokens generated since
        mine, theirs = (torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in (mine, theirs))
        return ParallelContext(torch.cat([mine, theirs]), self.temperature, self.lse_scale)


def parallel_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       parallel_context: ParallelContext | None = None, **kwargs):
    """The model's own attention unless a ParallelContext is given; then explicit attention with APE's adjustments."""
    if parallel_context is None:
        base = ALL_ATTENTION_FUNCTIONS.get(getattr(module.config, "_cepe_base_attention", "sdpa"),
                                           sdpa_attention_forward)
        return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    batch, heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    groups = heads // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    # Softmax in (at least) fp32, as SDPA kernels do.
    logits = (query @ key.transpose(-1, -2)).to(torch.promote_types(query.dtype, torch.float32))
    logits = logits * (scaling if scaling is not None else head_dim**-0.5)
    is_passage = torch.zeros((batch, kv_len), dtype=torch.bool, device=query.device)
    known = min(kv_len, parallel_context.is_passage.shape[1])
    is_passage[:, :known] = parallel_context.is_passage[:, :known]
    is_passage = is_passage[:, None, None, :]
    if attention_mask is None:  # SDPA's mask creation skipped it: plain causal, aligned to the end
        allowed = torch.ones((q_len, kv_len), dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    else:
        allowed = attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask == 0
    if parallel_context.temperature != 1.0:
        logits = torch.where(is_passage, logits / parallel_context.temperature, logits)
    lowest = torch.finfo(logits.dtype).min
    logits = logits.masked_fill(~allowed, lowest)
    if parallel_context.lse_scale != 1.0:
        passage_lse = torch.logsumexp(logits.masked_fill(~is_passage, lowest), dim=-1, keepdim=True)
        logits = torch.where(is_passage & allowed, logits + (parallel_context.lse_scale - 1) * passage_lse, logits)
    weights = torch.softmax(logits, dim=-1).to(value.dtype)
    return (weights @ value).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, parallel_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@dataclass(frozen=True)
class ParallelPlan:
    """What a parallel request decodes from besides its question: the shared prefix and each passage, as token ids."""

    prefix: list[int]
    chunks: list[list[int]]


class ParallelReader(Reader):
    """Works on any decoder, no trained weights; passage KV caches could be stored per passage."""

    name = "parallel"

    # ape_scale 0.6: best of the settings swept on NQ (benchmarks/results/ape_sweep_k20.md); without it (1.0)
    # 20 passages swamp the prompt and SmolLM2 answers "The answer is:" and stops.
    def __init__(self, model, tokenizer, *, ape_temperature: float = APE_TEMPERATURE, ape_scale: float = APE_SCALE,
                 max_passage_tokens: int = 512, prefill_batch: int = 8, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        self.ape_temperature = ape_temperature
        self.ape_scale = ape_scale
        self.max_passage_tokens = max_passage_tokens
        self.prefill_batch = prefill_batch
        # Calls without a ParallelContext go to the attention the model was loaded with (SDPA, flash-attention),
        # so other readers sharing this model are unaffected.
        if model.config._attn_implementation != ATTENTION_NAME:
            model.config._cepe_base_attention = model.config._attn_implementation
            model.config._attn_implementation = ATTENTION_NAME

    # --- prompt pieces: prefix | passages (parallel) | question -----------------------------------

    def pieces(self, question: str, passages: Sequence[Passage], conversation: Conversation = NO_CONVERSATION
               ) -> tuple[list[int], list[list[int]], list[int]]:
        prefix, chunks, query = super().pieces(question, passages, conversation)
        return prefix, [chunk[: self.max_passage_tokens] for chunk in chunks], query

    def prepare(self, question: str, passages: Sequence[Passage],
                conversation: Conversation = NO_CONVERSATION) -> PreparedPrompt[ParallelPlan]:
        prefix, chunks, query = self.pieces(question, passages, conversation)
        self.check_fits(len(prefix) + max((len(c) for c in chunks), default=0) + len(query))
        return PreparedPrompt(query, list(passages), plan=ParallelPlan(prefix, chunks))

    @torch.inference_mode()
    def encode_passages(self, prefix: list[int], chunks: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) of shape (1, kv_heads, prefix + all passage tokens, head_dim)."""
        device = self.device
        prefix_ids = torch.tensor([prefix], device=device)
        prefix_cache = DynamicCache(config=self.model.config)
        self.model(input_ids=prefix_ids, cache=prefix_cache, use_cache=True, logits_to_keep=1)
        prefix_kv = [(layer.keys, layer.values) for layer in prefix_cache.layers]
        chunks = [c for c in chunks if c]
        per_chunk: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in chunks]
        # Batches of similar length: padding every passage to the longest of fifty wastes most of the compute.
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i]))
        for start in range(0, len(order), self.prefill_batch):
            group = order[start:start + self.prefill_batch]
            for row, layers in zip(group, self._prefill_group(prefix, prefix_kv, [chunks[i] for i in group])):
                per_chunk[row] = layers
        return [(torch.cat([keys] + [layers[i][0] for layers in per_chunk], 2),
                 torch.cat([values] + [layers[i][1] for layers in per_chunk], 2))
                for i, (keys, values) in enumerate(prefix_kv)]

    def _prefill_group(self, prefix: list[int], prefix_kv, chunks: list[list[int]]):
        """For each chunk, per layer (keys, values) of its own tokens only, shaped (1, kv_heads, len, head_dim)."""
        device = self.device
        width = max(len(c) for c in chunks)
        ids = torch.zeros((len(chunks), width), dtype=torch.long, device=device)
        mask = torch.zeros((len(chunks), len(prefix) + width), dtype=torch.long, device=device)
        mask[:, : len(prefix)] = 1
        for row, chunk in enumerate(chunks):
            ids[row, : len(chunk)] = torch.tensor(chunk)
            mask[row, len(prefix): len(prefix) + len(chunk)] = 1
        cache = DynamicCache(config=self.model.config)
        for index, (keys, values) in enumerate(prefix_kv):
            cache.update(keys.expand(len(chunks), -1, -1, -1).contiguous(),
                         values.expand(len(chunks), -1, -1, -1).contiguous(), index)
        positions = torch.arange(len(prefix), len(prefix) + width, device=device).expand(len(chunks), -1)
        self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                   logits_to_keep=1)
        own = [slice(len(prefix), len(prefix) + len(chunk)) for chunk in chunks]
        return [[(layer.keys[row:row + 1, :, own[row]], layer.values[row:row + 1, :, own[row]])
                 for layer in cache.layers] for row in range(len(chunks))]

    def parallel_cache(self, prepared: Sequence[PreparedPrompt[ParallelPlan]]):
        """KV caches of every prepared request's prefix + passages, left-padded to one batch.

        Returns (cache, past_mask, position_offsets, ParallelContext). APE's knobs only act on requests
        with two or more passages: with one, parallel reading is exactly concatenation.
        """
        contexts, offsets, prefix_lengths, counts = [], [], [], []
        for request in prepared:
            prefix, chunks = request.plan.prefix, request.plan.chunks
            contexts.append(self.encode_passages(prefix, chunks))
            # Every passage sits at positions after the prefix; the question follows the longest one.
            offsets.append(len(prefix) + max((len(c) for c in chunks), default=0))
            prefix_lengths.append(len(prefix))
            counts.append(sum(1 for c in chunks if c))
        lengths = [ctx[0][0].shape[2] for ctx in contexts]
        total = max(lengths)
        cache = DynamicCache(config=self.model.config)
        past_mask = torch.zeros((len(contexts), total), dtype=torch.long, device=self.device)
        is_passage = torch.zeros((len(contexts), total), dtype=torch.bool, device=self.device)
        for row, (length, prefix_length, count) in enumerate(zip(lengths, prefix_lengths, counts)):
            past_mask[row, total - length:] = 1
            if count > 1:
                is_passage[row, total - length + prefix_length:] = True
        for layer_index in range(len(contexts[0])):
            keys = torch.cat([left_pad(ctx[layer_index][0], total - n) for ctx, n in zip(contexts, lengths)])
            values = torch.cat([left_pad(ctx[layer_index][1], total - n) for ctx, n in zip(contexts, lengths)])
            cache.update(keys, values, layer_index)
        context = ParallelContext(is_passage, self.ape_temperature, self.ape_scale)
        return cache, past_mask, torch.tensor(offsets), context

    def start(self, prepared: list[PreparedPrompt], config: GenerationConfig,
              limits: list[int] | None = None) -> DecodeBatch:
        cache, past_mask, offsets, parallel_context = self.parallel_cache(prepared)
        return DecodeBatch(self.model, [p.ids for p in prepared], self.tokenizer, config, device=self.device,
                           cache=cache, position_offsets=offsets, past_mask=past_mask, limits=limits,
                           constraints=self.span_constraints(prepared), parallel_context=parallel_context)

