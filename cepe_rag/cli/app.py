"""The `cepe-rag` command line (typer + rich): one module per command, imported when its command runs, so that
`cepe-rag docs` loads no model library and `--help` lists the commands without importing any."""

from __future__ import annotations

import importlib
import os
import sys

import click
import typer
from typer.core import TyperGroup

from cepe_rag.cli.output import console
from cepe_rag.types import CepeRagError

# name: (module, its Typer app, the one-line help `cepe-rag --help` lists)
COMMANDS = {
    "index": ("cepe_rag.cli.index", "app", "Add new or changed documents to an index and drop deleted ones (safe to "
                                            "interrupt and re-run)."),
    "docs": ("cepe_rag.cli.docs", "docs_app", "List, show and remove the documents of an index (no model loads)."),
    "ask": ("cepe_rag.cli.ask", "app", "Retrieve passages for QUESTION and answer it, streaming the answer and listing "
                                        "its sources."),
    "chat": ("cepe_rag.cli.chat", "app", "Talk to your documents: load once, then answer question after question with "
                                          "sources."),
    "eval": ("cepe_rag.cli.evaluate", "app", "Open-domain QA: retrieval once, then every reader at every k; resumable, "
                                              "cached per run folder."),
    "bench": ("cepe_rag.cli.bench", "app", "Time to first token, decode speed and memory of every reader as the "
                                            "context grows."),
    "train": ("cepe_rag.cli.train", "app", "Give the decoder CEPE cross-attention: train it on a stage of the recipe "
                                            "(resumable)."),
    "serve": ("cepe_rag.cli.serve", "app", "Serve an OpenAI-compatible API and a chat page over an index."),
}


class LazyCommands(TyperGroup):
    """Click's lazily loaded subcommands: a command's module is imported when it runs (or shows its own help)."""

    listing = False

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute, summary = COMMANDS[name]
        if self.listing:  # the group's help needs the one-line help only
            return click.Command(name, help=summary)
        command = typer.main.get_command(getattr(importlib.import_module(module), attribute))
        command.name = name
        return command

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self.listing = False


app = typer.Typer(cls=LazyCommands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Retrieval-augmented generation that reads many passages through CEPE.")


@app.callback()
def _group() -> None:
    """Retrieval-augmented generation that reads many passages through CEPE."""


def main() -> None:
    try:
        app()
    except CepeRagError as error:
        console.print(f"[red]error:[/] {error}", highlight=False)
        exit_now(1)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        exit_now(130)
    except SystemExit as done:
        exit_now(done.code if isinstance(done.code, int) else 0 if done.code is None else 1)


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown of torch and transformers' modules (~1.5 s of an `ask`).

    Every command has closed its files and committed its transactions by the time it returns, and
    nothing registers work for interpreter exit, so only the streams need flushing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # `accelerate launch -m cepe_rag.cli.app train ...`
    main()
