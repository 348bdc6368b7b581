"""One way to build a reader from settings: the CLI (`ask`, `eval`) and the LangChain adapters all go through
`build_reader(ReaderSpec(...))`, so a setting has one name and one default everywhere."""

from __future__ import annotations

from functools import lru_cache

import torch

from cepe_rag.cepe import load_cepe
from cepe_rag.models import load_decoder, resolve_dtype
from cepe_rag.readers.base import Reader
from cepe_rag.readers.cepe import CepeReader
from cepe_rag.readers.generation import GenerationConfig
from cepe_rag.readers.parallel import ParallelReader
from cepe_rag.readers.prompting import ClosedBookReader, ConcatReader
from cepe_rag.settings import ReaderSpec, check_choice

READERS: dict[str, type[Reader]] = {
    "cepe": CepeReader, "parallel": ParallelReader, "concat": ConcatReader, "closed-book": ClosedBookReader,
}


def make_reader(name: str, model, tokenizer, **kwargs) -> Reader:
    """A reader over an already loaded model (tests and benchmarks); entry points use `build_reader`."""
    check_choice(name, tuple(READERS), "reader")
    return READERS[name](model, tokenizer, **kwargs)


def build_reader(spec: ReaderSpec, *, generation: GenerationConfig | None = None, device: str = "cpu",
                 dtype: torch.dtype | None = None, system_prompt: str | None = None) -> Reader:
    """The reader `spec` describes; decoders and CEPE checkpoints load once per process and are shared."""
    check_choice(spec.reader, tuple(READERS), "reader")  # before any model loads
    options = {"generation": generation, **spec.reader_options()}
    if system_prompt:
        options["system_prompt"] = system_prompt
    if spec.reader == "cepe":
        model = _cepe_model(spec.checkpoint(), device, dtype)
        return make_reader(spec.reader, model, model.decoder_tokenizer, **options)
    return make_reader(spec.reader, *_decoder(spec.decoder, device, dtype), **options)


@lru_cache(maxsize=4)
def _decoder(name: str, device: str, dtype: torch.dtype | None):
    return load_decoder(name, device=device, dtype=dtype)


@lru_cache(maxsize=4)
def _cepe_model(path: str, device: str, dtype: torch.dtype | None):
    return load_cepe(path, device=device, dtype=dtype or resolve_dtype(None, device))
