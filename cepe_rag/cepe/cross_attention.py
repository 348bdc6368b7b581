"""CEPE: cross-attention to independently encoded context chunks, added to a frozen stock decoder.

The stock transformers model is wrapped, not forked. The last `num_cross_attn_layers` decoder layers
get a `cross_attn` block between self-attention and the MLP (the released checkpoints' layout):

    h = h + self_attn(input_layernorm(h))
    h = h + cross_attn(h, context)            # only when context is given
    h = h + mlp(post_attention_layernorm(h))

Context reaches the layers as a `cross_context` keyword that the stock model forwards untouched to
every decoder layer. With no context the forward pass is the stock one, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

CEPE_ARCHITECTURE = "LlamaForCausalContextLM"
CROSS_KV_MODES = ("cache", "absorb", "project")


@dataclass
class CrossContext:
    """Encoder states of a batch of requests, seen by the decoder as one key/value sequence per request.

    states: (batch, tokens, encoder_hidden) with all chunk padding removed, or (batch, n_states, tokens,
    encoder_hidden) when each cross-attention layer reads its own encoder layer (`num_cross_attn_hidden_states`
    > 1); mask: (batch, tokens), True for real tokens. `cross_kv` says how the layers read them:
      cache   K/V projected once per layer and kept for every decoding step (the most memory: two projections
              per layer and token);
      absorb  K/V never formed: the layers attend to the states themselves through their projection weights,
              q.(W_k s) = (W_k^T q).s and sum a W_v s = W_v (sum a s), so the context costs its states alone, shared
              by every layer, at about the decoding speed of `cache` (equal to rounding);
      project K/V projected at every forward and dropped (training: one forward per context, and activation
              checkpointing recomputes them).
    """

    states: torch.Tensor
    mask: torch.Tensor
    cross_kv: str = "cache"
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    token_ids: torch.Tensor | None = None  # (batch, tokens): what each state encodes, for a copy pointer
    # (batch, tokens): log of each token's chunk weight (a relevance prior), added to every attention score over the
    # context: a chunk's share of the attention is multiplied by its weight (then renormalised). None: no prior.
    prior: torch.Tensor | None = None
    # (batch, tokens): more log weights for the copy pointer alone (e.g. names the question itself mentions, which
    # an answer does not repeat); the cross-attention does not see them. None: none.
    copy_prior: torch.Tensor | None = None
    # (batch, tokens, pointer keys): the copy pointer's keys, projected at the first step and kept for the others
    # (they cost as much per step as the rest of the pointer); never kept in training's `project` mode.
    copy_keys: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.cross_kv not in CROSS_KV_MODES:
            raise ValueError(f"cross_kv must be one of {', '.join(CROSS_KV_MODES)}, not {self.cross_kv!r}")
        # A request with no context tokens must add exactly nothing: its output is zeroed.
        self.has_context = self.mask.any(-1).to(self.states.dtype)[:, None, None]
        # Additive rather than boolean: a fully masked row then softmaxes to finite values, not NaN.
        self.attn_bias = torch.zeros(self.mask.shape, dtype=self.states.dtype, device=self.states.device)
        if self.prior is not None:
            self.attn_bias += self.prior.to(self.attn_bias.dtype)
        self.attn_bias.masked_fill_(~self.mask, torch.finfo(self.states.dtype).min)
        self.attn_bias = self.attn_bias[:, None, None, :]
        if bool(self.mask.all()) and self.prior is None:  # nothing to mask: lets SDPA pick its fastest kernel
            self.attn_bias = None

    @classmethod
    def from_chunks(cls, chunks: Sequence[Sequence[torch.Tensor]], *, cross_kv: str = "cache",
                    dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                    token_ids: Sequence[Sequence[Sequence[int]]] | None = None,
                    chunk_log_weights: Sequence[Sequence[float | Sequence[float]]] | None = None,
                    copy_log_weights: Sequence[Sequence[float | Sequence[float]]] | None = None
                    ) -> CrossContext | None:
        """Build from per-request lists of per-chunk states (tokens, hidden), cast to `dtype` on `device` while they are
        copied into one right-padded tensor (no intermediate copy of the whole context); None if there is no token.
        `token_ids`, laid out as `chunks`, are the chunks' token ids (a copy pointer reads them); `chunk_log_weights`,
        one per chunk, the relevance prior: a number (every token of the chunk gets it) or one per token of it;
        `copy_log_weights`, laid out alike, the copy pointer's own (`copy_prior`)."""
        lengths = [sum(c.shape[-2] for c in request) for request in chunks]
        if max(lengths, default=0) == 0:
            return None
        reference = next(c for request in chunks for c in request if c.shape[-2])
        states = torch.zeros((len(chunks), *reference.shape[:-2], max(lengths), reference.shape[-1]),
                             dtype=dtype or reference.dtype, device=device or reference.device)
        mask = torch.zeros((len(chunks), max(lengths)), dtype=torch.bool, device=states.device)
        priors = [None if weights is None else torch.zeros(mask.shape, dtype=torch.float32)
                  for weights in (chunk_log_weights, copy_log_weights)]
        for row, request in enumerate(chunks):
            start = 0
            for index, chunk in enumerate(request):
                states[row, ..., start:start + chunk.shape[-2], :] = chunk
                for prior, weights in zip(priors, (chunk_log_weights, copy_log_weights)):
                    if prior is not None:
                        prior[row, start:start + chunk.shape[-2]] = torch.as_tensor(weights[row][index],
                                                                                    dtype=torch.float32)
                start += chunk.shape[-2]
            mask[row, :start] = True
        prior, copy_prior = (None if p is None else p.to(mask.device) for p in priors)
        ids = None
        if token_ids is not None:
            ids = torch.zeros(mask.shape, dtype=torch.long)
            for row, request in enumerate(token_ids):
                flat = [token for chunk in request for token in chunk]
                if len(flat) != lengths[row]:  # states of another text or tokenization: copies would be misplaced
                    raise ValueError(f"request {row}: {len(flat)} token ids for {lengths[row]} context states")
                ids[row, :len(flat)] = torch.tensor(flat, dtype=torch.long)
            ids = ids.to(mask.device)
        return cls(states, mask, cross_kv, token_ids=ids, prior=prior, copy_prior=copy_prior)

    def key_values(self, attention: CrossAttention) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self.kv.get(attention.layer_idx)
        if cached is not None:
            return cached
        key_values = attention.project_context(self.states)
        if self.cross_kv == "cache":
            self.kv[attention.layer_idx] = key_values
        return key_values

    def layer_states_for_pointer(self) -> torch.Tensor:
        """(batch, tokens, encoder_hidden): the last encoder state, as the last cross-attention layer reads it."""
        return self.states[:, -1] if self.states.dim() == 4 else self.states

    def pointer_keys(self, pointer) -> torch.Tensor:
        """The copy pointer's keys for these context tokens, projected once per request while decoding."""
        if self.copy_keys is not None:
            return self.copy_keys
        keys = pointer.project_context(self.layer_states_for_pointer())
        if self.cross_kv != "project":
            self.copy_keys = keys
        return keys

    def select_rows(self, rows: torch.Tensor) -> CrossContext:
        """These requests only (a batch whose other rows have ended), their cached K/V kept."""
        picked = CrossContext(self.states[rows], self.mask[rows], self.cross_kv,
                              token_ids=None if self.token_ids is None else self.token_ids[rows],
                              prior=None if self.prior is None else self.prior[rows],
                              copy_prior=None if self.copy_prior is None else self.copy_prior[rows])
        picked.kv = {layer: (k[rows], v[rows]) for layer, (k, v) in self.kv.items()}
        picked.copy_keys = None if self.copy_keys is None else self.copy_keys[rows]
        return picked

    def join(self, other: CrossContext, pad_self: int = 0, pad_other: int = 0) -> CrossContext:
        """The requests of both (rows joining a running batch), context tokens padded on the right to the longer;
        the decoder-cache padding (`pad_*`) does not concern cross-attention."""
        tokens = max(self.mask.shape[1], other.mask.shape[1])

        def widen(tensor: torch.Tensor, dim: int) -> torch.Tensor:
            missing = tokens - tensor.shape[dim]
            return F.pad(tensor, (0, 0) * (-1 - dim) + (0, missing)) if missing else tensor

        ids = (None if self.token_ids is None or other.token_ids is None else
               torch.cat([widen(self.token_ids, -1), widen(other.token_ids, -1)]))
        prior = None
        if self.prior is not None or other.prior is not None:
            prior = torch.cat([widen(self.log_weights(), -1), widen(other.log_weights(), -1)])
        copy_prior = None
        if self.copy_prior is not None or other.copy_prior is not None:
            copy_prior = torch.cat([widen(self.copy_log_weights(), -1), widen(other.copy_log_weights(), -1)])
        joined = CrossContext(torch.cat([widen(self.states, -2), widen(other.states, -2)]),
                              torch.cat([widen(self.mask, -1), widen(other.mask, -1)]),
                              self.cross_kv if self.cross_kv == other.cross_kv else "absorb", token_ids=ids,
                              prior=prior, copy_prior=copy_prior)
        if joined.cross_kv == "cache" and self.kv.keys() == other.kv.keys():
            joined.kv = {layer: tuple(torch.cat([widen(mine, -2), widen(theirs, -2)])
                                      for mine, theirs in zip(self.kv[layer], other.kv[layer])) for layer in self.kv}
        if self.copy_keys is not None and other.copy_keys is not None:
            joined.copy_keys = torch.cat([widen(self.copy_keys, -2), widen(other.copy_keys, -2)])
        return joined

    def log_weights(self) -> torch.Tensor:
        """The prior, or the weights of 1 (log 0) that a context without one has."""
        return self.prior if self.prior is not None else torch.zeros(self.mask.shape, device=self.mask.device)

    def copy_log_weights(self) -> torch.Tensor:
        """The copy pointer's own log weights, or zeros."""
        return self.copy_prior if self.copy_prior is not None else torch.zeros(self.mask.shape,
                                                                               device=self.mask.device)

    def pointer_prior(self) -> torch.Tensor | None:
        """What the copy pointer adds to its scores: the relevance prior and its own weights."""
        if self.copy_prior is None:
            return self.prior
        return self.copy_prior if self.prior is None else self.prior + self.copy_prior

    def kv_bytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv.values())


class CrossAttention(nn.Module):
    """Non-causal attention from decoder tokens to context tokens; no rotary positions, no biases."""

    def __init__(self, config, layer_idx: int, encoder_hidden_size: int, norm: nn.Module):
        super().__init__()
        self.layer_idx = layer_idx
        # With several encoder hidden states, layers read them counted from the back: the last decoder layer the
        # encoder's last state, the one before it the state before that (the reference's semantics).
        self.encoder_state_index = (-1 if getattr(config, "num_cross_attn_hidden_states", 1) <= 1
                                    else layer_idx - config.num_hidden_layers)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.layernorm = norm
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(encoder_hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(encoder_hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        # Flamingo's gate (`cross_attn_gate`, cepe-rag adapters only): the block adds tanh(gate) times its output,
        # zero at the start, so training can only learn to add to what the decoder reads in its own prompt.
        self.gate = nn.Parameter(torch.zeros(1)) if getattr(config, "cross_attn_gate", False) else None

    def layer_states(self, states: torch.Tensor) -> torch.Tensor:
        """The encoder states this layer reads: (batch, tokens, encoder_hidden)."""
        return states[:, self.encoder_state_index] if states.dim() == 4 else states

    def project_context(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.layer_states(states)
        batch, tokens, _ = states.shape
        shape = (batch, tokens, self.num_kv_heads, self.head_dim)
        states = states.to(self.k_proj.weight.dtype)
        return self.k_proj(states).view(shape).transpose(1, 2), self.v_proj(states).view(shape).transpose(1, 2)

    def attend_to_states(self, query: torch.Tensor, states: torch.Tensor, attn_mask: torch.Tensor | None):
        """The attention of `query` (batch, kv_heads, queries, head_dim) to K/V that are never formed: W_k moves to
        the query side and W_v after the weighted sum, so all heads read the one (tokens, encoder_hidden) sequence."""
        batch, kv_heads, queries, _ = query.shape
        key_weight = self.k_proj.weight.view(kv_heads, self.head_dim, -1)
        value_weight = self.v_proj.weight.view(kv_heads, self.head_dim, -1)
        absorbed = torch.matmul(query, key_weight).view(batch, 1, kv_heads * queries, -1)
        states = self.layer_states(states)[:, None].to(absorbed.dtype)
        mixed = F.scaled_dot_product_attention(absorbed, states, states, attn_mask=attn_mask,
                                               scale=self.head_dim ** -0.5)
        return torch.matmul(mixed.view(batch, kv_heads, queries, -1), value_weight.transpose(1, 2))

    def forward(self, hidden_states: torch.Tensor, context: CrossContext) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        groups = self.num_heads // self.num_kv_heads
        query = self.q_proj(self.layernorm(hidden_states)).view(batch, length, self.num_kv_heads, groups,
                                                                self.head_dim)
        # No causality and no positions, so the query heads sharing a K/V head are just more queries of it: fold
        # them into the query length. Same attention as GQA, without the K/V broadcast (at one decoding token
        # and thousands of context tokens, the CPU kernel runs ~1.6x faster).
        query = query.permute(0, 2, 3, 1, 4).reshape(batch, self.num_kv_heads, groups * length, self.head_dim)
        attn_mask = None if context.attn_bias is None else context.attn_bias.to(query.dtype)
        if context.cross_kv == "absorb":
            output = self.attend_to_states(query, context.states, attn_mask)
        else:
            key, value = context.key_values(self)
            output = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
        output = output.view(batch, self.num_kv_heads, groups, length, self.head_dim).permute(0, 3, 1, 2, 4)
        output = self.o_proj(output.reshape(batch, length, -1))
        if self.gate is not None:
            output = output * torch.tanh(self.gate).to(output.dtype)
        return output * context.has_context.to(output.dtype)


class CrossAttentionLayerMixin:
    """Mixed into a stock decoder layer class (Llama, Mistral, Qwen2 share this layer shape)."""

    cross_attn: CrossAttention

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, cross_context: CrossContext | None = None, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            use_cache=use_cache, position_embeddings=position_embeddings, **kwargs,
        )
        hidden_states = residual + hidden_states

        if cross_context is not None:
            hidden_states = hidden_states + self.cross_attn(hidden_states, cross_context)

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


_LAYER_CLASSES: dict[type, type] = {}
SUPPORTED_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")


def add_cross_attention(layer: nn.Module, cross_attn: CrossAttention) -> None:
    """Give a stock decoder layer a cross-attention block in place, keeping its parameter names."""
    base = type(layer)
    if base.__name__ not in SUPPORTED_LAYERS:
        raise ValueError(f"CEPE supports {', '.join(SUPPORTED_LAYERS)} decoder layers, not {base.__name__}")
    if base not in _LAYER_CLASSES:
        _LAYER_CLASSES[base] = type(f"CrossAttention{base.__name__}", (CrossAttentionLayerMixin, base), {})
    layer.__class__ = _LAYER_CLASSES[base]
    layer.cross_attn = cross_attn


def init_cross_attention(layer: nn.Module, mode: str, initializer_range: float = 0.02) -> None:
    """The paper's initialisation (reference train.py): q from the layer's self-attention, k/v from the top-left
    slice of its k/v (a full copy when the encoder is as wide as the decoder), the norm from
    `post_attention_layernorm`; `copy` also copies o_proj, `zero` zeroes it (the model then starts as the
    frozen decoder); `none` keeps whatever is loaded. k/v are drawn at random when the encoder is wider than
    the decoder (nothing to copy)."""
    if mode == "none":
        return
    if mode not in ("zero", "copy"):
        raise ValueError(f"unknown init mode {mode!r}: zero, copy or none")
    cross, attn = layer.cross_attn, layer.self_attn
    with torch.no_grad():
        cross.q_proj.weight.copy_(attn.q_proj.weight)
        for new, old in ((cross.k_proj, attn.k_proj), (cross.v_proj, attn.v_proj)):
            if new.in_features <= old.in_features and new.out_features <= old.out_features:
                new.weight.copy_(old.weight[: new.out_features, : new.in_features])
            else:
                nn.init.normal_(new.weight, std=initializer_range)
        cross.layernorm.weight.copy_(layer.post_attention_layernorm.weight)
        if mode == "copy":
            cross.o_proj.weight.copy_(attn.o_proj.weight)
        else:
            cross.o_proj.weight.zero_()


def decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    return decoder.model.layers
