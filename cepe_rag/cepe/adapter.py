"""CEPE checkpoints as an adapter: only what training changed, over a named stock decoder and encoder.

A folder with `cepe_adapter.json` and `cross_attention.safetensors` (plus the encoder's weights when it
was trained) is megabytes, not the whole decoder; loading it rebuilds the decoder and encoder from their
names and fills in the trained tensors. `CepeForCausalLM.from_pretrained` reads both this layout and
the released one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cepe_rag.types import CepeRagError

ADAPTER_CONFIG = "cepe_adapter.json"
ADAPTER_WEIGHTS = "cross_attention.safetensors"
ADAPTER_FORMAT = "cepe-rag-adapter"


def build_encoder_for(spec: str, decoder: nn.Module, decoder_tokenizer):
    """(encoder, tokenizer) from a spec: `decoder-layers:N` (the decoder's first N layers, made
    bidirectional, sharing its tokenizer) or a sentence-transformers / Hugging Face encoder name."""
    from transformers import AutoModel, AutoTokenizer

    from cepe_rag.cepe.context import build_encoder
    from cepe_rag.models import embedder_path

    if spec.startswith("decoder-layers:"):
        n_layers = int(spec.split(":", 1)[1])
        config = decoder.config.to_dict()
        config.update(num_hidden_layers=n_layers, is_decoder=False)
        for key in ("architectures", "num_cross_attn_layers", "encoder_config", "encoder_hidden_size"):
            config.pop(key, None)
        encoder = build_encoder(config)
        source = decoder.base_model.state_dict()
        own = encoder.state_dict()
        encoder.load_state_dict({k: source[k] for k in own})
        return encoder.to(dtype=decoder.dtype), decoder_tokenizer
    path = embedder_path(spec)
    try:
        return AutoModel.from_pretrained(path, dtype=decoder.dtype), AutoTokenizer.from_pretrained(path)
    except OSError as error:
        raise CepeRagError(f"cannot load encoder {spec!r}: {str(error).splitlines()[0]}") from None


def new_cepe_model(decoder: str, encoder: str, *, num_cross_attn_layers: int, init_mode: str = "zero",
                   device: str = "cpu", dtype=torch.float32, chunking: dict | None = None):
    """A fresh (untrained cross-attention) CEPE model over named decoder and encoder."""
    from cepe_rag.cepe.model import CepeForCausalLM
    from cepe_rag.models import load_decoder

    decoder_model, tokenizer = load_decoder(decoder, dtype=dtype)
    decoder_model.requires_grad_(False)
    encoder_model, encoder_tokenizer = build_encoder_for(encoder, decoder_model, tokenizer)
    model = CepeForCausalLM(decoder_model, encoder_model.eval(), num_cross_attn_layers=num_cross_attn_layers,
                            init_mode=init_mode, encoder_tokenizer=encoder_tokenizer, chunking=chunking)
    model.decoder_tokenizer = tokenizer
    model.source_names = {"decoder": decoder, "encoder": encoder}
    return model.to(device)


def save_adapter(model, folder: str | Path, *, include_encoder: bool = False, card: dict | None = None,
                 dtype: torch.dtype = torch.float16) -> None:
    """Trained tensors in `dtype` (float16 halves the file; the loader casts to the model's dtype)."""
    from safetensors.torch import save_file

    names = getattr(model, "source_names", None)
    if not names:
        raise CepeRagError("this model was not built from named decoder/encoder; use save_pretrained")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).cpu().contiguous() for k, v in model.released_state_dict().items()
             if ".cross_attn." in k or (include_encoder and k.startswith("encoder."))}
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": ADAPTER_FORMAT})
    from cepe_rag.cepe.model import CEPE_RAG_CHUNKING

    config = {"format": ADAPTER_FORMAT, **names, "num_cross_attn_layers": model.config.num_cross_attn_layers,
              **{key: getattr(model.config, key) for key in CEPE_RAG_CHUNKING},
              "includes_encoder": include_encoder, **(card or {})}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).exists()


def load_adapter(folder: str | Path, *, dtype=torch.float32, device: str = "cpu"):
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        weights = load_file(str(folder / ADAPTER_WEIGHTS))
    except (OSError, json.JSONDecodeError) as error:
        raise CepeRagError(f"{folder}: unreadable CEPE adapter ({str(error).splitlines()[0]})") from None
    if config.get("format") != ADAPTER_FORMAT:
        raise CepeRagError(f"{folder / ADAPTER_CONFIG}: not a cepe-rag adapter")
    from cepe_rag.cepe.model import CEPE_RAG_CHUNKING

    # Adapters written before the chunking was recorded were all trained with cepe-rag's own.
    chunking = {key: config.get(key, default) for key, default in CEPE_RAG_CHUNKING.items()}
    model = new_cepe_model(config["decoder"], config["encoder"], num_cross_attn_layers=config["num_cross_attn_layers"],
                           init_mode="none", dtype=dtype, chunking=chunking)
    own = {k: v for k, v in model.released_state_dict().items()}
    unknown = sorted(set(weights) - set(own))
    if unknown:
        raise CepeRagError(f"{folder}: adapter tensors that this model lacks: {', '.join(unknown[:3])}")
    missing = sorted(k for k in own if ".cross_attn." in k and k not in weights)
    if missing:
        raise CepeRagError(f"{folder}: adapter lacks cross-attention tensors: {', '.join(missing[:3])}")
    with torch.no_grad():
        for name, tensor in weights.items():
            if own[name].shape != tensor.shape:
                raise CepeRagError(f"{folder}: {name} has shape {tuple(tensor.shape)}, expected "
                                   f"{tuple(own[name].shape)}")
            own[name].copy_(tensor.to(own[name].dtype))
    model.training_history = config.get("training_history", [])
    return model.to(device=device).eval().requires_grad_(False)
