"""The speed/memory benchmark as a script: same as `cepe-rag bench` (see its --help)."""

from cepe_rag.cli.app import app

if __name__ == "__main__":
    app(["bench", *__import__("sys").argv[1:]])
