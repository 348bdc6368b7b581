"""`cepe-rag bench`: time to first token, decode speed and memory of every reader as the context grows."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cepe_rag.bench import METHODS, run_all, write_reports
from cepe_rag.bench.speed import TABLE_HEADER
from cepe_rag.cli.options import (
    DeviceOption,
    DtypeOption,
    quiet_libraries,
)
from cepe_rag.cli.output import console
from cepe_rag.models import (
    default_device,
    resolve_dtype,
)
from cepe_rag.settings import (
    BENCH_METHODS,
)
from cepe_rag.types import CepeRagError

app = typer.Typer(add_completion=False)


@app.command()
def bench(
    methods: Annotated[str, typer.Option(help="Comma-separated: cepe, cepe-precomputed, cepe-absorbed, cepe-stored, "
                                              "cepe-stored-absorbed, parallel, concat.")] = ",".join(BENCH_METHODS),
    k: Annotated[str, typer.Option("--k", help="Comma-separated passage counts (128 tokens each).")] = (
        "1,10,50,100,500,1000"),
    model: Annotated[str, typer.Option(help="default (SmolLM2-135M with its packaged CEPE adapter) or 7b "
                                            "(LLaMA-2-7B shapes, random weights).")] = "default",
    device: DeviceOption = None,
    dtype: DtypeOption = None,
    max_concat_tokens: Annotated[int, typer.Option(help="Skip concat above this many context tokens.")] = 16384,
    max_parallel_k: Annotated[int, typer.Option(help="Skip parallel above this many passages.")] = 500,
    out: Annotated[Path, typer.Option(help="Folder for bench.json, bench.md and bench.png.")] = Path("runs/bench"),
    cross_layers: Annotated[int | None, typer.Option(
        help="Bare CEPE cross-attention (no gate, copy pointer or prior) in the last N decoder layers; default: "
             "the packaged adapter as it ships (8 layers), or every layer with --model 7b.",
    )] = None,
    index_dir: Annotated[Path | None, typer.Option("--index", help="cepe-stored: an index built with "
                                                                   "--context-states.")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Rounds of every row, each in a fresh process; the table "
                                                     "gives medians (the runs are in bench.json).")] = 1,
) -> None:
    """Time to first token, decode speed and memory of every reader as the context grows (k=0: no context)."""

    quiet_libraries()
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise CepeRagError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    device = device or default_device()
    dtype = str(resolve_dtype(dtype, device)).removeprefix("torch.")  # the one rule, as ask and serve
    print(TABLE_HEADER, flush=True)
    result = run_all(chosen, sorted({int(x) for x in k.split(",")}), model=model, device=device, dtype=dtype,
                     max_concat_tokens=max_concat_tokens, max_parallel_k=max_parallel_k, cross_layers=cross_layers,
                     index=str(index_dir) if index_dir else None, repeats=repeats,
                     log=lambda line: print(line, flush=True))
    write_reports(result, out)
    for name, value in result["ratios"].items():
        print(f"{name}: {value}")
    console.print(f"bench.json, bench.md and bench.png in {out}")
