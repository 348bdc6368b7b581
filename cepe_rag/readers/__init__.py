"""How retrieved passages reach the decoder."""

from cepe_rag.readers.base import Reader
from cepe_rag.readers.cepe import CepeReader
from cepe_rag.readers.generation import GenerationConfig
from cepe_rag.readers.parallel import ParallelReader
from cepe_rag.readers.prompting import ClosedBookReader, ConcatReader
from cepe_rag.readers.spec import ReaderSpec, build_reader
from cepe_rag.settings import DEFAULT_READER
from cepe_rag.types import CepeRagError

READERS: dict[str, type[Reader]] = {
    "cepe": CepeReader, "parallel": ParallelReader, "concat": ConcatReader, "closed-book": ClosedBookReader,
}


def make_reader(name: str, model, tokenizer, **kwargs) -> Reader:
    if name not in READERS:
        raise CepeRagError(f"unknown reader {name!r}; choose one of: {', '.join(READERS)}")
    return READERS[name](model, tokenizer, **kwargs)


__all__ = ["DEFAULT_READER", "READERS", "CepeReader", "ClosedBookReader", "ConcatReader", "GenerationConfig",
           "ParallelReader", "Reader", "ReaderSpec", "build_reader", "make_reader"]
