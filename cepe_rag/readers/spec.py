"""One way to build a reader from settings: the CLI (`ask`, `eval`) and the LangChain adapters all go through
`build_reader(ReaderSpec(...))`, so a setting has one name and one default everywhere."""

from __future__ import annotations

from functools import lru_cache

import torch

from cepe_rag.cepe import load_cepe
from cepe_rag.models import load_decoder
from cepe_rag.readers.base import Reader
from cepe_rag.readers.cepe import CepeReader
from cepe_rag.readers.generation import GenerationConfig
from cepe_rag.readers.parallel import ParallelReader
from cepe_rag.readers.prompting import ClosedBookReader, ConcatReader
from cepe_rag.settings import ReaderSpec
from cepe_rag.types import CepeRagError


def build_reader(spec: ReaderSpec, *, generation: GenerationConfig | None = None, device: str = "cpu",
                 dtype: torch.dtype | None = None, system_prompt: str | None = None) -> Reader:
    """The reader `spec` describes; decoders and CEPE checkpoints load once per process and are shared."""
    common = {"generation": generation, "prompt_style": spec.prompt_style}
    if system_prompt:
        common["system_prompt"] = system_prompt
    if spec.reader == "cepe":
        model = _cepe_model(spec.checkpoint(), device, dtype)
        return CepeReader(model, model.decoder_tokenizer, n_prompt_passages=spec.n_prompt_passages, **common)
    model, tokenizer = _decoder(spec.decoder, device, dtype)
    if spec.reader == "concat":
        return ConcatReader(model, tokenizer, most_relevant=spec.most_relevant, **common)
    if spec.reader == "parallel":
        return ParallelReader(model, tokenizer, ape_temperature=spec.ape_temperature,
                              ape_scale=spec.ape_scale, **common)
    if spec.reader == "closed-book":
        return ClosedBookReader(model, tokenizer, **common)
    raise CepeRagError(f"unknown reader {spec.reader!r}; choose one of: cepe, parallel, concat, closed-book")


@lru_cache(maxsize=4)
def _decoder(name: str, device: str, dtype: torch.dtype | None):
    return load_decoder(name, device=device, dtype=dtype)


@lru_cache(maxsize=4)
def _cepe_model(path: str, device: str, dtype: torch.dtype | None):
    return load_cepe(path, device=device, dtype=dtype or torch.float32)
