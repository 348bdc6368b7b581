"""The CEPE model: a frozen stock decoder + cross-attention + a context encoder, in the released layout."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from cepe_rag.cepe.cross_attention import (
    CEPE_ARCHITECTURE,
    CrossAttention,
    CrossContext,
    add_cross_attention,
    decoder_layers,
    init_cross_attention,
)
from cepe_rag.cepe.encoder import encode_chunks, make_bidirectional
from cepe_rag.cepe.pointer import CopyPointer
from cepe_rag.cepe.states import ContextStates
from cepe_rag.models import contiguous_head_input
from cepe_rag.padding import pad_token_ids
from cepe_rag.token_forms import line_start_forms
from cepe_rag.types import CepeRagError

# Config fields of the released checkpoints, with the values a fresh model gets.
CEPE_CONFIG_DEFAULTS = {
    "do_cross_attention": True,
    "num_cross_attn_hidden_states": 1,
    "encoder_is_model": False,
    "train_encoder": False,
    "encode_mode": "context_only",
    "lm_loss_cof": 1.0,
    "kl_loss_cof": 0.0,
    "kl_loss_mode": "smooth",
}
ENCODER_TOKENIZER_DIR = "encoder_tokenizer"
# How chunks become encoder tokens. The released checkpoints were evaluated with `add_special_tokens=False` and
# left truncation (and trained on raw token windows); cepe-rag's own adapters were trained with the encoder
# tokenizer's special tokens ([CLS] ... [SEP] for MiniLM) and right truncation. Each checkpoint records its own.
REFERENCE_CHUNKING = {"chunk_add_special_tokens": False, "chunk_truncation_side": "left"}
CEPE_RAG_CHUNKING = {"chunk_add_special_tokens": True, "chunk_truncation_side": "right"}


class CepeForCausalLM(nn.Module):
    """`decoder` is a stock *ForCausalLM; its last `num_cross_attn_layers` layers gain `cross_attn`.

    Parameter names outside this class's prefixes are the released checkpoint's: see `released_state_dict`.
    """

    def __init__(self, decoder: nn.Module, encoder: nn.Module, *, num_cross_attn_layers: int | None = None,
                 init_mode: str = "zero", encoder_tokenizer=None, max_chunk_tokens: int = 256,
                 chunking: dict | None = None, gate: bool | None = None, copy_pointer: bool | None = None):
        """gate: give every cross-attention block a zero-initialised tanh gate (None: as the config says).
        copy_pointer: add a copy pointer over the context tokens (cepe/pointer.py; None: as the config says)."""
        super().__init__()
        self._line_start_tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self.decoder = decoder
        self.encoder = encoder
        self.encoder_tokenizer = encoder_tokenizer
        self.max_chunk_tokens = max_chunk_tokens
        contiguous_head_input(decoder)
        config = decoder.config
        layers = decoder_layers(decoder)
        n_cross = num_cross_attn_layers or getattr(config, "num_cross_attn_layers", None) or len(layers)
        if not 0 < n_cross <= len(layers):
            raise ValueError(f"num_cross_attn_layers must be in 1..{len(layers)}, got {n_cross}")
        for name, value in {**CEPE_CONFIG_DEFAULTS, **CEPE_RAG_CHUNKING}.items():
            if not hasattr(config, name):
                setattr(config, name, value)
        for name, value in (chunking or {}).items():
            setattr(config, name, value)
        if gate is not None:
            config.cross_attn_gate = gate
        if getattr(config, "cross_attn_gate", False) and init_mode == "zero":
            raise CepeRagError("a zero gate over a zeroed o_proj never trains (both gradients are zero): initialise "
                               "a gated model with init_mode='copy' (the gate alone makes it start as the decoder)")
        if config.chunk_truncation_side not in ("left", "right"):
            raise CepeRagError(f"chunk_truncation_side must be left or right, not {config.chunk_truncation_side!r}")
        if config.encode_mode != "context_only":
            raise CepeRagError(f"encode_mode {config.encode_mode!r} is not supported (only context_only: chunks are "
                               "encoded without the query)")
        n_states = config.num_cross_attn_hidden_states
        encoder_layers = getattr(encoder.config, "num_hidden_layers", 0)
        if n_states > 1 and n_cross > encoder_layers + 1:
            raise CepeRagError(f"num_cross_attn_hidden_states > 1 gives each of the {n_cross} cross-attention layers "
                               f"its own encoder state, but the encoder has only {encoder_layers + 1}")
        config.num_cross_attn_layers = n_cross
        config.encoder_hidden_size = encoder.config.hidden_size
        config.encoder_config = encoder.config.to_dict()
        if config.model_type == "llama":
            config.architectures = [CEPE_ARCHITECTURE]
        make_bidirectional(encoder)
        for index in range(len(layers) - n_cross, len(layers)):
            layer = layers[index]
            norm = type(layer.input_layernorm)(config.hidden_size, eps=config.rms_norm_eps)
            cross = CrossAttention(config, index, config.encoder_hidden_size, norm)
            add_cross_attention(layer, cross.to(device=layer.input_layernorm.weight.device,
                                                dtype=layer.input_layernorm.weight.dtype))
            init_cross_attention(layer, init_mode, getattr(config, "initializer_range", 0.02))
        if copy_pointer if copy_pointer is not None else getattr(config, "copy_pointer", False):
            self.add_pointer()

    @property
    def pointer(self) -> CopyPointer | None:
        return getattr(self.cross_attention_layers()[-1].cross_attn, "pointer", None)

    def add_pointer(self) -> None:
        """A fresh copy pointer (near zero weight in the mixture), kept with the last cross-attention layer so that
        adapters save and load it with the cross-attention tensors."""
        if getattr(self.encoder.config, "vocab_size", None) != self.config.vocab_size:
            raise CepeRagError("a copy pointer needs an encoder that shares the decoder's tokenizer "
                               "(decoder-layers:N)")
        self.config.copy_pointer = True
        if not hasattr(self.config, "copy_line_starts"):  # a new pointer copies line starts; loaders set their own
            self.config.copy_line_starts = True
        cross = self.cross_attention_layers()[-1].cross_attn
        if getattr(cross, "pointer", None) is None:
            weight = cross.o_proj.weight
            cross.pointer = CopyPointer(self.config.hidden_size, self.config.encoder_hidden_size,
                                        initializer_range=getattr(self.config, "initializer_range", 0.02)
                                        ).to(device=weight.device, dtype=weight.dtype)

    @property
    def config(self):
        return self.decoder.config

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    def cross_attention_layers(self) -> list[nn.Module]:
        return [layer for layer in decoder_layers(self.decoder) if hasattr(layer, "cross_attn")]

    def add_gates(self) -> None:
        """Give every ungated cross-attention block a zero gate (a gated run from an ungated adapter): the model
        then starts as the plain decoder, whatever the adapter had learned."""
        self.config.cross_attn_gate = True
        for layer in self.cross_attention_layers():
            weight = layer.cross_attn.o_proj.weight
            if layer.cross_attn.gate is None:
                layer.cross_attn.gate = nn.Parameter(torch.zeros(1, device=weight.device, dtype=weight.dtype))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                cross_context: CrossContext | None = None, **kwargs):
        """The stock decoder's forward; `cross_context` (or None for the plain decoder) reaches every layer."""
        if cross_context is not None:
            kwargs["cross_context"] = cross_context
        pointer = self.pointer if cross_context is not None else None
        if pointer is None:
            return self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                cache=cache, use_cache=use_cache, **kwargs)
        if cross_context.token_ids is None:
            raise CepeRagError("this CEPE model copies from its context: build the context with its token ids")
        final: list[torch.Tensor] = []
        hook = self.decoder.base_model.norm.register_forward_hook(lambda module, args, output: final.append(output))
        try:
            out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, use_cache=use_cache, **kwargs)
        finally:
            hook.remove()
        kept = out.logits.shape[1]
        hidden = final[0][:, -kept:]
        out.logits = self.copy_log_probs(out.logits, hidden, input_ids[:, -kept:], cross_context)
        return out

    def copy_log_probs(self, logits: torch.Tensor, hidden: torch.Tensor, input_ids: torch.Tensor,
                       context: CrossContext) -> torch.Tensor:
        """The decoder's logits (batch, length, vocab) mixed with the pointer's copies from `context`."""
        embeds = self.decoder.get_input_embeddings()(input_ids)
        attention = self.pointer.attention(hidden, embeds, context.pointer_keys(self.pointer), context.mask,
                                           context.pointer_prior())
        length = logits.shape[1]
        copied_as = self.copy_token_ids(context.token_ids[:, None].expand(-1, length, -1), input_ids)
        return self.pointer.mix(logits, hidden, attention, copied_as, context.mask.any(-1)[:, None].expand(-1, length))

    def copy_token_ids(self, token_ids: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """(..., tokens): the vocabulary id each context token (`token_ids`, (..., tokens)) is copied as at the
        position of `input_ids` (...) it is aligned with. A word inside a passage carries the space before it
        (" Lucia"), but an answer's first word follows a line break and is written without one ("Lucia"), a token
        that no passage holds; so, with `config.copy_line_starts`, after a token that ends a line each context token
        is copied as its form without the leading space, where the vocabulary has one."""
        if not getattr(self.config, "copy_line_starts", False):
            return token_ids
        unspaced, ends_line = self.line_start_tables(token_ids.device)
        at_line_start = ends_line[input_ids]
        if not bool(at_line_start.any()):  # most decoding steps: nothing to map
            return token_ids
        return torch.where(at_line_start[..., None], unspaced[token_ids], token_ids)

    def line_start_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Over the vocabulary: each token's id without its leading space (its own id if it has no leading space or
        the vocabulary lacks that form), and whether a token ends a line. Built once, kept on the device last asked
        for (decoding asks at every step)."""
        if self._line_start_tables is None:
            tokenizer = self.encoder_tokenizer or getattr(self, "decoder_tokenizer", None)
            if tokenizer is None:
                raise CepeRagError("copying line starts needs the model's tokenizer")
            self._line_start_tables = line_start_forms(tokenizer, self.config.vocab_size)
        if self._line_start_tables[0].device != torch.device(device):
            self._line_start_tables = tuple(table.to(device) for table in self._line_start_tables)
        return self._line_start_tables

    # --- context ---------------------------------------------------------------------------------

    def tokenize_chunks(self, texts: Sequence[str]) -> list[list[int]]:
        return [ids for ids, _ in self._tokenize_chunks(texts)]

    def chunk_token_offsets(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """Each chunk token's (start, end) characters in its text, laid out as `tokenize_chunks` lays out the ids."""
        return [offsets for _, offsets in self._tokenize_chunks(texts, offsets=True)]

    def _tokenize_chunks(self, texts: Sequence[str], offsets: bool = False) -> list[tuple[list[int], list]]:
        tokenizer = self.encoder_tokenizer
        if tokenizer is None:
            raise CepeRagError("this CEPE model has no encoder tokenizer")
        if not texts:  # a request without passages (fast tokenizers fail on an empty batch)
            return []
        config = self.config
        side = tokenizer.truncation_side
        try:
            tokenizer.truncation_side = config.chunk_truncation_side
            encoded = tokenizer(list(texts), truncation=True, max_length=self.max_chunk_tokens,
                                add_special_tokens=config.chunk_add_special_tokens, return_offsets_mapping=offsets)
        finally:
            tokenizer.truncation_side = side
        spans = encoded["offset_mapping"] if offsets else [[]] * len(texts)
        # An empty chunk has no tokens at all (not just [CLS] [SEP]): it must add nothing.
        return [(ids, [tuple(span) for span in spans_of]) if text.strip() else ([], [])
                for text, ids, spans_of in zip(texts, encoded["input_ids"], spans)]

    def states_stamp(self) -> str:
        """What decides a passage's encoder states: the encoder's weights (a digest of every tensor's shape and first
        values), its tokenizer, and the chunking. Stored states are used only under the same stamp."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.encoder.state_dict().items()):
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            # bfloat16-rounded, so a float32 and a bfloat16 load of one checkpoint share a stamp
            digest.update(tensor.detach().flatten()[:4096].to(torch.bfloat16).float().cpu().numpy().tobytes())
        tokenizer = self.encoder_tokenizer
        config = self.config
        return (f"encoder sha256:{digest.hexdigest()[:16]} vocab:{len(tokenizer) if tokenizer else 0} "
                f"chunks:{self.max_chunk_tokens}/{config.chunk_truncation_side}/{config.chunk_add_special_tokens} "
                f"states:{config.num_cross_attn_hidden_states} hidden:{self.encoder.config.hidden_size}")

    @torch.inference_mode()
    def encode_context(self, texts: Sequence[str], ids: Sequence[int] | None = None,
                       batch_size: int = 64) -> ContextStates:
        """Encode passages once; the states do not depend on any question."""
        token_ids = self.tokenize_chunks(texts)
        states = self.encode_token_chunks(token_ids, batch_size=batch_size)
        return ContextStates(list(ids) if ids is not None else list(range(len(texts))), states)

    def encode_token_chunks(self, token_ids: list[list[int]], batch_size: int = 64) -> list[torch.Tensor]:
        """One right-padded encoder batch per `batch_size` chunks; returns unpadded per-chunk states."""
        device = self.encoder.device
        pad = getattr(self.encoder_tokenizer, "pad_token_id", None) or 0
        all_states = self.config.num_cross_attn_hidden_states > 1
        out: list[torch.Tensor] = []
        for start in range(0, len(token_ids), batch_size):
            chunk = token_ids[start:start + batch_size]
            ids, mask = pad_token_ids(chunk, pad, side="right", device=device)
            hidden = encode_chunks(self.encoder, ids, mask, all_states) if ids.shape[1] else None
            out.extend(hidden[row, ..., : len(tokens), :] if len(tokens) else self._empty_states(device)
                       for row, tokens in enumerate(chunk))
        return out

    def _empty_states(self, device) -> torch.Tensor:
        n_states = self.config.num_cross_attn_hidden_states
        extra = (self.encoder.config.num_hidden_layers + 1,) if n_states > 1 else ()
        return torch.zeros((*extra, 0, self.encoder.config.hidden_size), device=device)

    def context_from_texts(self, chunks_per_request: Sequence[Sequence[str]], *, cross_kv: str = "cache"):
        """All chunks of all requests through the encoder as one batch, then one CrossContext."""
        flat = [text for chunks in chunks_per_request for text in chunks]
        token_ids = self.tokenize_chunks(flat) if flat else []
        states = self.encode_token_chunks(token_ids) if flat else []
        return self.context_from_states(group_by_request(states, chunks_per_request), cross_kv=cross_kv,
                                        token_ids=group_by_request(token_ids, chunks_per_request))

    def context_from_states(self, states_per_request: Sequence[Sequence[torch.Tensor]], *, cross_kv: str = "cache",
                            token_ids: Sequence[Sequence[Sequence[int]]] | None = None,
                            chunk_log_weights: Sequence[Sequence[float | Sequence[float]]] | None = None,
                            copy_log_weights: Sequence[Sequence[float | Sequence[float]]] | None = None):
        """token_ids (laid out as the states): needed by a model with a copy pointer, ignored by one without;
        chunk_log_weights (per chunk, or per token of each): a prior on the attention to the context
        (CrossContext.prior); copy_log_weights: the copy pointer's own (CrossContext.copy_prior)."""
        dtype = self.cross_attention_layers()[0].cross_attn.k_proj.weight.dtype
        if self.pointer is None:
            token_ids = None
        elif token_ids is None:
            raise CepeRagError("this CEPE model copies from its context: pass the chunks' token ids")
        return CrossContext.from_chunks(states_per_request, cross_kv=cross_kv, dtype=dtype, device=self.device,
                                        token_ids=token_ids, chunk_log_weights=chunk_log_weights,
                                        copy_log_weights=copy_log_weights if self.pointer is not None else None)

    # --- construction and checkpoints ------------------------------------------------------------

    def released_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameter names as in hyen/CEPE-LLaMA-2-7B: `model.*`, `lm_head.*`, `encoder.*`."""
        state = {}
        for name, tensor in self.decoder.state_dict().items():
            state[name] = tensor
        for name, tensor in self.encoder.state_dict().items():
            state[f"encoder.{name}"] = tensor
        if getattr(self.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        return state

    def save_pretrained(self, folder: str | Path, *, tokenizer=None, dtype: torch.dtype | None = None) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = reference_config(self.config.to_dict(), is_decoder=True)
        config["encoder_config"] = reference_config(config["encoder_config"], is_decoder=False)
        config["architectures"] = [CEPE_ARCHITECTURE] if config.get("model_type") == "llama" else \
            [type(self.decoder).__name__]
        config.pop("auto_map", None)
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).contiguous()
                 for k, v in self.released_state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        tokenizer = tokenizer or getattr(self, "decoder_tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if self.encoder_tokenizer is not None and self.encoder_tokenizer is not tokenizer:
            self.encoder_tokenizer.save_pretrained(folder / ENCODER_TOKENIZER_DIR)

    def load_released_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        decoder_state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
        encoder_state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        tied = getattr(self.config, "tie_word_embeddings", False)
        if tied:
            decoder_state.pop("lm_head.weight", None)
        missing = []
        for module, part in ((self.decoder, decoder_state), (self.encoder, encoder_state)):
            result = module.load_state_dict(part, strict=False, assign=True)
            missing += [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
            if result.unexpected_keys:
                raise CepeRagError(f"unexpected checkpoint tensors: {result.unexpected_keys[:5]}")
        if missing:
            raise CepeRagError(f"checkpoint is missing tensors: {missing[:5]}")
        if tied:
            self.decoder.lm_head.weight = self.decoder.get_input_embeddings().weight
        meta = [name for name, p in self.named_parameters() if p.is_meta]
        if meta:
            raise CepeRagError(f"checkpoint left parameters uninitialised: {meta[:5]}")




def reference_config(config: dict, *, is_decoder: bool) -> dict:
    """A config dict that the reference code (transformers 4.34's LlamaConfig) reads as intended.

    transformers 5 writes `rope_parameters` and `dtype` and leaves out `is_decoder`; 4.34 reads `rope_theta`,
    `rope_scaling`, `torch_dtype`, and builds a *bidirectional* decoder when `is_decoder` is missing.
    """
    config = dict(config)
    config["is_decoder"] = is_decoder
    if config.get("model_type") != "llama":
        return config
    rope = dict(config.get("rope_parameters") or {})
    config["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", "default")
    # 4.34 knows linear and dynamic scaling as {"type", "factor"}; no scaling is null.
    config["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, "factor": rope.get("factor")}
    config.setdefault("pretraining_tp", 1)
    config.setdefault("attention_bias", False)
    if config.get("dtype") is not None:
        config["torch_dtype"] = str(config["dtype"]).removeprefix("torch.")
    return config


def group_by_request(flat: Sequence, chunks_per_request: Sequence[Sequence]) -> list[list]:
    """Split a flat list (one item per chunk, all requests in order) back into per-request lists."""
    grouped, start = [], 0
    for chunks in chunks_per_request:
        grouped.append(list(flat[start:start + len(chunks)]))
        start += len(chunks)
    return grouped
