"""Options and checks shared by the commands: the reader options made from ReaderSpec's fields, where an
index keeps its passages, retrieval, filters and dtype; every check runs before a model loads."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import typing
from pathlib import Path
from typing import Annotated

import typer

from cepe_rag.cli.output import console
from cepe_rag.indexes.layout import STORES, check_store_options
from cepe_rag.models import (
    cpu_has_fast_bfloat16,
)
from cepe_rag.pipelines.session import RagSession
from cepe_rag.settings import (
    DEFAULT_READER,
    DEFAULT_RETRIEVAL,
    ReaderSpec,
)
from cepe_rag.types import CepeRagError

IndexOption = Annotated[Path, typer.Option("--index", help="Index folder.")]
def _option(name: str, annotation, default) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


# The options that describe a reader, shared by ask, chat, eval and serve: made from ReaderSpec's fields (their help
# and flags are there), added to each command's signature by @reader_options and handed to it as one dict.
_SPEC_TYPES = typing.get_type_hints(ReaderSpec)
READER_OPTIONS = [
    *(_option(f.name, Annotated[_SPEC_TYPES[f.name], typer.Option(*filter(None, [f.metadata["flag"]]),
                                                                  help=f.metadata["help"])], f.default)
      for f in dataclasses.fields(ReaderSpec) if f.metadata),
    _option("cutoff", Annotated[bool, typer.Option(
        help="--no-cutoff reads all --k passages, however unrelated to the question.")], True),
]


def reader_options(command):
    """Give `command` the shared reader options (typer reads `__signature__`); it receives them as `reader`-less
    ReaderSpec fields in its `spec_options` argument."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "spec_options"]

    @functools.wraps(command)
    def with_options(*args, **kwargs):
        spec_options = {p.name: kwargs.pop(p.name) for p in READER_OPTIONS}
        if not spec_options.pop("cutoff"):
            spec_options["read_margin"] = None
        return command(*args, spec_options=spec_options, **kwargs)

    with_options.__signature__ = inspect.Signature([*own, *READER_OPTIONS])
    return with_options


# Where an index keeps its passages, shared by index, ask, eval and serve: given to `index`, they say where to create
# the index (a new --index folder's manifest records it); given to the others, where the collection is reached from
# here (overriding the manifest). Handed to the command as `qdrant`: a QdrantLocation, or None for FAISS.
STORE_OPTIONS = [
    _option("store", Annotated[str | None, typer.Option(
        help=f"Where the passages live: {' or '.join(STORES)} (a Qdrant collection; the --index folder keeps its "
             "manifest). Default: what the --index folder is; faiss for a new one.")], None),
    _option("qdrant_url", Annotated[str | None, typer.Option(
        help="A Qdrant server or cluster, e.g. http://localhost:6333 (API key from QDRANT_API_KEY); implies "
             "--store qdrant.")], None),
    _option("qdrant_path", Annotated[Path | None, typer.Option(
        help="An embedded Qdrant store (a folder; one process at a time); implies --store qdrant. Default: qdrant/ "
             "inside the --index folder.")], None),
    _option("qdrant_collection", Annotated[str | None, typer.Option(
        help="The Qdrant collection (default: the --index folder's name).")], None),
]


def store_options(command):
    """Give `command` the --store/--qdrant-* options; it receives them checked against its --index folder (before
    anything heavy loads) as `qdrant`: where its Qdrant collection is, or None."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "qdrant"]

    @functools.wraps(command)
    def with_options(*args, **kwargs):
        chosen = [kwargs.pop(p.name) for p in STORE_OPTIONS]
        store, url, path, collection = chosen
        qdrant = check_store_options(kwargs["index_dir"], store, url, str(path) if path else None, collection)
        return command(*args, qdrant=qdrant, **kwargs)

    with_options.__signature__ = inspect.Signature([*own, *STORE_OPTIONS])
    return with_options


RetrievalOption = Annotated[str, typer.Option(
    "--retrieval", help="hybrid (dense + BM25, fused by reciprocal rank), dense (MiniLM + FAISS) or lexical (BM25).")]
SourceFilterOption = Annotated[str | None, typer.Option(
    "--source", help="Only passages whose source path matches this glob (e.g. '*/reports/*.pdf').")]
TitleFilterOption = Annotated[str | None, typer.Option("--title", help="Only passages whose title matches this glob.")]
AbstainOption = Annotated[bool, typer.Option(
    help="Answer 'not in the documents' instead of reading when no retrieved passage is relevant enough "
         "(docs/retrieval.md, 'Abstention'; lexical retrieval never abstains).")]
KOption = Annotated[int, typer.Option("--k", help="Passages to retrieve; the relevance cutoff reads those close to the "
                                                 "best one (--no-cutoff: all of them).")]
ReaderOption = Annotated[str | None, typer.Option(help="concat, parallel, closed-book, or cepe. Default: cepe when "
                                                       "--cepe-model is given, else concat.")]
MaxNewTokensOption = Annotated[int, typer.Option(help="Answer length limit in tokens.")]
TemperatureOption = Annotated[float, typer.Option(help="0 = greedy.")]
DeviceOption = Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if available).")]
DtypeOption = Annotated[str | None, typer.Option(
    help="float32, bfloat16 or float16 (default: bfloat16 on a GPU and on CPUs with native bfloat16 (AMX, "
         "AVX512-BF16: 2-3x faster), else float32).")]


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def asked_reader(reader: str | None, spec_options: dict) -> ReaderSpec:
    """The one reader `ask` and `chat` answer with: --reader, else cepe when --cepe-model is given, else the default."""
    return ReaderSpec(reader=reader or ("cepe" if spec_options["cepe_model"] else DEFAULT_READER), **spec_options)


def check_options(k: list[int], specs: list, dtype: str | None, retrieval: str = DEFAULT_RETRIEVAL) -> None:
    """Every argument checked before a model loads (a mistake costs well under a second, not a model load)."""
    if not k or min(k) < 1:
        raise CepeRagError("--k must be at least 1")
    RagSession.check(specs, dtype=dtype, retrieval=retrieval)


def warn_slow_dtype(torch_dtype, device: str) -> None:
    if str(device) == "cpu" and str(torch_dtype) == "torch.bfloat16" and cpu_has_fast_bfloat16() is False:
        console.print("[yellow]warning:[/] this CPU has no AMX or AVX512-BF16: bfloat16 runs several times slower "
                      "than float32 here; leave out --dtype for float32")
