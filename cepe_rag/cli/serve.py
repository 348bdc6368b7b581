"""`cepe-rag serve`: the OpenAI-compatible API and the chat page over an index."""

from __future__ import annotations

import socket
from typing import Annotated

import typer
import uvicorn

from cepe_rag.cli.opening import open_session
from cepe_rag.cli.options import (
    AbstainOption,
    DeviceOption,
    DtypeOption,
    IndexOption,
    RetrievalOption,
    check_options,
    reader_options,
    store_options,
)
from cepe_rag.cli.output import console
from cepe_rag.indexes.layout import QdrantLocation, check_index_folder
from cepe_rag.serving import Limits, RagService, create_app
from cepe_rag.settings import (
    DEFAULT_ANSWER_TOKENS,
    DEFAULT_INDEX,
    DEFAULT_K,
    DEFAULT_READER,
    DEFAULT_RETRIEVAL,
    ReaderSpec,
)
from cepe_rag.types import CepeRagError

app = typer.Typer(add_completion=False)


@app.command()
@reader_options
@store_options
def serve(
    index_dir: IndexOption = DEFAULT_INDEX,
    reader: Annotated[list[str] | None, typer.Option(
        help="Reader to load, repeatable or comma-separated: concat, parallel, cepe, closed-book. Each is a model id "
             "clients choose with `model`. Default: concat.")] = None,
    k: Annotated[int, typer.Option("--k", help="Passages retrieved when a request does not ask for a k.")] = DEFAULT_K,
    max_k: Annotated[int, typer.Option(help="Largest k a request may ask for.")] = 100,
    max_tokens: Annotated[int, typer.Option(help="Longest answer a request may ask for, in tokens (prompts are "
                                                 "budgeted for it).")] = 512,
    host: Annotated[str, typer.Option(help="Address to listen on (the default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="CEPE_RAG_API_KEY", show_envvar=True,
                                                help="Require `Authorization: Bearer KEY` on /v1 routes.")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for the model; beyond, HTTP 429.")] = 64,
    max_batch: Annotated[int, typer.Option(help="Requests decoded together in one batch.")] = 16,
    batch_window_ms: Annotated[float, typer.Option(help="How long a request waits for others to batch with.")] = 5.0,
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    retrieval: RetrievalOption = DEFAULT_RETRIEVAL,
    abstain: AbstainOption = True,
    spec_options: dict | None = None,
    qdrant: QdrantLocation | None = None,
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/models, /v1/retrieve, /health) over an index."""
    names = [name.strip() for value in reader or [DEFAULT_READER] for name in value.split(",") if name.strip()]
    specs = [ReaderSpec(reader=name, **spec_options) for name in names]
    check_options([k], specs, dtype, retrieval)
    if len({spec.label for spec in specs}) < len(specs):
        raise CepeRagError(f"--reader lists a reader twice: {', '.join(names)}")
    for value, least, what in ((max_k, k, "--max-k (at least --k)"), (max_tokens, 1, "--max-tokens"),
                               (max_queue, 1, "--max-queue"), (max_batch, 1, "--max-batch"),
                               (batch_window_ms, 0, "--batch-window-ms")):
        if value < least:
            raise CepeRagError(f"{what} must be at least {least}, got {value}")
    if not 1 <= port <= 65535:
        raise CepeRagError(f"--port must be between 1 and 65535, got {port}")
    check_index_folder(index_dir)
    check_port_free(host, port)  # before the models load
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who can reach this "
                      "machine can use the server")

    session = open_session(index_dir, specs, retrieval=retrieval, qdrant=qdrant, device=device, dtype=dtype,
                           abstain=abstain, k=k, max_new_tokens=max_tokens)
    limits = Limits(max_tokens=max_tokens, default_max_tokens=min(DEFAULT_ANSWER_TOKENS, max_tokens), max_k=max_k,
                    default_k=k)
    service = RagService(session, limits=limits, max_batch=max_batch, max_waiting=max_queue,
                         batch_window_ms=batch_window_ms)
    readers, retriever = session.readers, session.retriever
    console.print(f"serving {', '.join(readers)} over {index_dir} ({retriever.store.count()} passages): chat page "
                  f"http://{host}:{port}/, API http://{host}:{port}/v1{' (API key required)' if api_key else ''}",
                  highlight=False)
    uvicorn.run(create_app(service, api_key=api_key), host=host, port=port, log_level="warning")


def check_port_free(host: str, port: int) -> None:
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        raise CepeRagError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
