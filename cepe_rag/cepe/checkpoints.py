"""CEPE checkpoints on disk: the released layout and cepe-rag's adapters, read by one `load_cepe`.

An adapter folder (`cepe_adapter.json` + `cross_attention.safetensors`, plus the encoder's weights when it
was trained) is megabytes, not the whole decoder: loading it rebuilds the decoder and encoder from their
names and fills in the trained tensors. A released-layout folder (hyen/CEPE-LLaMA-2-7B) holds everything.
This module imports the model, never the reverse.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from huggingface_hub import snapshot_download
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from cepe_rag.cepe.encoder import build_encoder
from cepe_rag.cepe.model import (
    CEPE_RAG_CHUNKING,
    ENCODER_TOKENIZER_DIR,
    REFERENCE_CHUNKING,
    CepeForCausalLM,
)
from cepe_rag.cepe.states import StateEncoder
from cepe_rag.models import default_device, embedder_path, load_decoder
from cepe_rag.types import CepeRagError

ADAPTER_CONFIG = "cepe_adapter.json"
ADAPTER_WEIGHTS = "cross_attention.safetensors"
ADAPTER_FORMAT = "cepe-rag-adapter"


def build_encoder_for(spec: str, decoder: nn.Module, decoder_tokenizer):
    """(encoder, tokenizer) from a spec: `decoder-layers:N` (the decoder's first N layers, made
    bidirectional, sharing its tokenizer) or a sentence-transformers / Hugging Face encoder name."""
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
                   device: str = "cpu", dtype=torch.float32, chunking: dict | None = None, gate: bool = False,
                   copy_pointer: bool = False):
    """A fresh (untrained cross-attention) CEPE model over named decoder and encoder."""
    decoder_model, tokenizer = load_decoder(decoder, dtype=dtype)
    decoder_model.requires_grad_(False)
    encoder_model, encoder_tokenizer = build_encoder_for(encoder, decoder_model, tokenizer)
    model = CepeForCausalLM(decoder_model, encoder_model.eval(), num_cross_attn_layers=num_cross_attn_layers,
                            init_mode=init_mode, encoder_tokenizer=encoder_tokenizer, chunking=chunking, gate=gate,
                            copy_pointer=copy_pointer)
    model.decoder_tokenizer = tokenizer
    model.source_names = {"decoder": decoder, "encoder": encoder}
    return model.to(device)


def save_adapter(model, folder: str | Path, *, include_encoder: bool = False, card: dict | None = None,
                 dtype: torch.dtype = torch.float16) -> None:
    """Trained tensors in `dtype` (float16 halves the file; the loader casts to the model's dtype)."""
    names = getattr(model, "source_names", None)
    if not names:
        raise CepeRagError("this model was not built from named decoder/encoder; use save_pretrained")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).cpu().contiguous() for k, v in model.released_state_dict().items()
             if ".cross_attn." in k or (include_encoder and k.startswith("encoder."))}
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": ADAPTER_FORMAT})
    pointer = {"copy_line_starts": bool(getattr(model.config, "copy_line_starts", False))} if model.pointer else {}
    config = {"format": ADAPTER_FORMAT, **names, "num_cross_attn_layers": model.config.num_cross_attn_layers,
              **{key: getattr(model.config, key) for key in CEPE_RAG_CHUNKING},
              "cross_attn_gate": bool(getattr(model.config, "cross_attn_gate", False)),
              "copy_pointer": model.pointer is not None, **pointer,
              "includes_encoder": include_encoder, **(card or {})}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).exists()


def load_adapter(folder: str | Path, *, dtype=torch.float32, device: str = "cpu"):

    folder = Path(folder)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        weights = load_file(str(folder / ADAPTER_WEIGHTS))
    except (OSError, json.JSONDecodeError) as error:
        raise CepeRagError(f"{folder}: unreadable CEPE adapter ({str(error).splitlines()[0]})") from None
    if config.get("format") != ADAPTER_FORMAT:
        raise CepeRagError(f"{folder / ADAPTER_CONFIG}: not a cepe-rag adapter")
    # Adapters written before the chunking was recorded were all trained with cepe-rag's own.
    chunking = {key: config.get(key, default) for key, default in CEPE_RAG_CHUNKING.items()}
    model = new_cepe_model(config["decoder"], config["encoder"], num_cross_attn_layers=config["num_cross_attn_layers"],
                           init_mode="none", dtype=dtype, chunking=chunking,
                           gate=config.get("cross_attn_gate", False),
                           copy_pointer=config.get("copy_pointer", False))
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
    if model.pointer is not None:  # adapters from before line-start copies were trained without them
        model.config.copy_line_starts = config.get("copy_line_starts", False)
    model.training_history = config.get("training_history", [])
    model.reader_settings = config.get("reader", {})  # how it is meant to be read, e.g. its relevance prior
    return model.to(device=device).eval().requires_grad_(False)


def load_cepe(name_or_path: str | Path, *, dtype=torch.float32, device: str = "cpu",
              trust_remote_code: bool = False) -> CepeForCausalLM:
    """A CEPE checkpoint: a cepe-rag adapter or the released layout (local folder, or hub id when online)."""
    folder = _resolve_folder(name_or_path)
    if is_adapter(folder):
        return load_adapter(folder, dtype=dtype, device=device)
    config_dict = _read_json(folder / "config.json")
    if "encoder_config" not in config_dict or "num_cross_attn_layers" not in config_dict:
        raise CepeRagError(f"{folder} is not a CEPE checkpoint (no encoder_config / num_cross_attn_layers)")
    if config_dict.get("encoder_is_model"):
        raise CepeRagError("checkpoints whose decoder doubles as encoder (encoder_is_model) are not supported")
    config_dict = {k: v for k, v in config_dict.items() if k not in ("architectures", "auto_map")}
    config = AutoConfig.for_model(**config_dict)

    # Parameters on the meta device (no random init of billions of weights); buffers real.
    with init_empty_weights(include_buffers=False):
        decoder = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        encoder = build_encoder(config_dict["encoder_config"])
    decoder_tokenizer = AutoTokenizer.from_pretrained(folder)
    encoder_tokenizer = (AutoTokenizer.from_pretrained(folder / ENCODER_TOKENIZER_DIR)
                         if (folder / ENCODER_TOKENIZER_DIR).exists() else decoder_tokenizer)
    model = CepeForCausalLM(decoder, encoder, num_cross_attn_layers=config_dict["num_cross_attn_layers"],
                            init_mode="none", encoder_tokenizer=encoder_tokenizer,
                            chunking={k: config_dict.get(k, v) for k, v in REFERENCE_CHUNKING.items()})
    model.decoder_tokenizer = decoder_tokenizer
    # Cast tensors rather than the model, so float32 buffers (rotary frequencies) stay float32.
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _read_state_dict(folder).items()}
    model.load_released_state_dict(state)
    return model.to(device=device).eval().requires_grad_(False)


def _resolve_folder(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:

        return Path(snapshot_download(str(name_or_path), allow_patterns=[
            "*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "encoder_tokenizer/*"]))
    except Exception as error:  # the hub raises many types; the user needs one line
        raise CepeRagError(f"cannot find CEPE checkpoint {name_or_path!r}: {str(error).splitlines()[0]}") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CepeRagError(f"{path}: {error}") from None


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """safetensors (single or sharded), or PyTorch .bin files loaded with weights_only=True."""
    if (folder / "model.safetensors").exists():
        return load_file(folder / "model.safetensors")
    for index_name, loader in (("model.safetensors.index.json", lambda f: load_file(f)),
                               ("pytorch_model.bin.index.json",
                                lambda f: torch.load(f, map_location="cpu", weights_only=True))):
        if (folder / index_name).exists():
            shards = sorted(set(_read_json(folder / index_name)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(loader(folder / shard))
            return state
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise CepeRagError(f"no weights in {folder} (model.safetensors, sharded safetensors or pytorch_model.bin)")


def load_state_encoder(checkpoint: str, device: str | None = None, state_format: str = "float16") -> StateEncoder:
    """A CEPE checkpoint's `StateEncoder` (on `device`, by default the GPU if there is one): `cepe-rag index
    --context-states` makes one here and, with `--engine ray`, one in every worker."""

    return StateEncoder(load_cepe(checkpoint, device=device or default_device()), state_format=state_format)
