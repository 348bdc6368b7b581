"""A copy pointer over the context tokens (pointer-generator, See et al., 2017), for encoders that share the
decoder's tokenizer (`--encoder decoder-layers:N`).

A name the decoder has never seen ("Lucia Zathfaexov") is hard to produce from its vocabulary distribution, even
when the cross-attention has found it; the pointer lets it copy the name's tokens from the context:

    p(y) = (1 - g) * p_decoder(y) + g * sum_j a_j [x_j = y]

where a is an attention of the decoder's final hidden state (and its current input token) over the context
tokens x_j, each keyed by its encoder state and its predecessor's (so that "the token after the one I just wrote"
is one lookup), and g = sigmoid(w.h + b) starts near zero (b = -4). The model returns log p as its logits, so
greedy decoding, sampling and training's cross-entropy need no change. Without context the decoder's logits are
returned untouched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GATE_BIAS = -4.0  # the copy share at the start: sigmoid(-4) = 1.8%


class CopyPointer(nn.Module):
    def __init__(self, hidden_size: int, encoder_hidden_size: int, *, heads: int = 4, head_dim: int = 64,
                 initializer_range: float = 0.02):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q_proj = nn.Linear(2 * hidden_size, heads * head_dim, bias=False)  # [final hidden; input embedding]
        self.k_proj = nn.Linear(2 * encoder_hidden_size, heads * head_dim, bias=False)  # [state; previous state]
        self.gate = nn.Linear(hidden_size, 1)
        for linear in (self.q_proj, self.k_proj):
            nn.init.normal_(linear.weight, std=initializer_range)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, GATE_BIAS)

    def project_context(self, states: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, heads * head_dim): the context tokens' keys, from their encoder states (batch, tokens,
        encoder_hidden); they depend on the context alone, so a request projects them once (`CrossContext`).
        k_proj reads [state; previous state]: its two halves are applied apart and the second's output shifted one
        token on, which equals it (to rounding) without copying the states twice over into a concatenation."""
        weight = self.k_proj.weight
        half = weight.shape[1] // 2
        states = states.to(weight.dtype)
        own = F.linear(states, weight[:, :half])
        previous = F.linear(states, weight[:, half:])
        # Across a chunk border a token sees the last chunk's end: harmless.
        return own + F.pad(previous, (0, 0, 1, 0))[:, :-1]

    def attention(self, hidden: torch.Tensor, embeds: torch.Tensor, keys: torch.Tensor,
                  mask: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, length, tokens): each position's copy distribution over its request's context tokens (heads
        averaged), in fp32 at least, given their keys (`project_context`); `prior` (batch, tokens), the context's log
        chunk weights, is added to the scores as the cross-attention adds it."""
        batch, length, _ = hidden.shape
        query = self.q_proj(torch.cat([hidden, embeds], -1).to(self.q_proj.weight.dtype))
        dtype = torch.promote_types(keys.dtype, torch.float32)
        keys = keys.view(batch, -1, self.heads, self.head_dim).transpose(1, 2).to(dtype)
        query = query.view(batch, length, self.heads, self.head_dim).transpose(1, 2).to(dtype)
        scores = (query @ keys.transpose(-1, -2)) * self.head_dim ** -0.5
        if prior is not None:
            scores = scores + prior[:, None, None, :].to(dtype)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        return scores.softmax(-1).mean(1)

    def mix(self, logits: torch.Tensor, hidden: torch.Tensor, attention: torch.Tensor, token_ids: torch.Tensor,
            has_context: torch.Tensor) -> torch.Tensor:
        """log p of the mixture (..., vocab), in fp32 at least, from the decoder's logits (..., vocab), its final
        hidden states (..., hidden), the copy attention (..., tokens) over context token ids (..., tokens); rows
        whose request has no context (has_context False) keep the decoder's distribution."""
        vocab = logits.shape[-1]
        copy = torch.zeros((*attention.shape[:-1], vocab), dtype=attention.dtype, device=attention.device)
        copy.scatter_add_(-1, token_ids.clamp(max=vocab - 1), attention)
        dtype = torch.promote_types(logits.dtype, attention.dtype)
        gate = self.gate(hidden.to(self.gate.weight.dtype)).to(dtype)
        decoder = torch.log_softmax(logits.to(dtype), -1)
        mixed = torch.logaddexp(F.logsigmoid(-gate) + decoder, F.logsigmoid(gate) + copy.clamp_min(1e-30).log())
        return torch.where(has_context[..., None], mixed, decoder)
