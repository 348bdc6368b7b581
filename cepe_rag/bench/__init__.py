"""Speed and memory benchmark of the readers (`cepe-rag bench`)."""

from cepe_rag.bench.speed import METHODS, BenchConfig, run_all, run_one, write_reports

__all__ = ["METHODS", "BenchConfig", "run_all", "run_one", "write_reports"]
