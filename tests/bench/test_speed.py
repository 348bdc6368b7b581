"""The benchmark's measurements run for every method (in-process, tiny k) and its reports are written."""

import json

import pytest

from cepe_rag.bench import METHODS, BenchConfig, run_one, write_reports
from cepe_rag.bench.speed import ratios

pytestmark = pytest.mark.real_models


@pytest.fixture(scope="module")
def rows():
    return [run_one(BenchConfig(method, k=2, answer_tokens=3)) for method in METHODS]


def test_every_method_measures_time_and_memory(rows):
    for row in rows:
        assert row["context_tokens"] == 256
        assert row["ttft_s"] > 0 and row["decode_ms"] > 0 and row["tokens_per_s"] > 0
        assert row["memory_above_weights_mib"] >= 0


def test_ratios_and_reports(rows, tmp_path):
    found = ratios(rows)
    assert set(found) == {"k2_concat_over_cepe_precomputed_ttft", "k2_recompute_over_cached_decode"} | (
        {"k2_concat_over_cepe_precomputed_memory"} if any("memory" in k for k in found) else set())
    result = {"environment": {}, "rows": rows + [{"method": "concat", "k": 999, "context_tokens": 127872,
                                                  "skipped": "over --max-concat-tokens"}], "ratios": found}
    write_reports(result, tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["method"] == "cepe"
    table = (tmp_path / "bench.md").read_text()
    assert "| cepe-recompute | 2 | 256 |" in table and "over --max-concat-tokens" in table
    assert (tmp_path / "bench.png").stat().st_size > 1000
