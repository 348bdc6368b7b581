"""How retrieved passages reach the decoder."""

from cepe_rag.readers.base import Reader
from cepe_rag.readers.cepe import CepeReader
from cepe_rag.readers.generation import GenerationConfig
from cepe_rag.readers.parallel import ParallelReader
from cepe_rag.readers.prompting import ClosedBookReader, ConcatReader
from cepe_rag.readers.spec import READERS, ReaderSpec, build_reader, make_reader
from cepe_rag.settings import DEFAULT_READER

__all__ = ["DEFAULT_READER", "READERS", "CepeReader", "ClosedBookReader", "ConcatReader", "GenerationConfig",
           "ParallelReader", "Reader", "ReaderSpec", "build_reader", "make_reader"]
