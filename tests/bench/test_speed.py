"""The benchmark's measurements run for every method (in-process, tiny k) and its reports are written."""

import json

import pytest

from cepe_rag.bench import METHODS, BenchConfig, run_one, write_reports
from cepe_rag.bench.speed import ratios

pytestmark = pytest.mark.real_models


@pytest.fixture(scope="module")
def index_with_states(tmp_path_factory, embedder):
    from cepe_rag.cepe import load_cepe
    from cepe_rag.cepe.states import StateEncoder
    from cepe_rag.pipelines.indexing import build_index
    from cepe_rag.settings import packaged_cepe

    corpus = tmp_path_factory.mktemp("bench") / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text(f"Passage {i} is about the river number {i} and its bridges.")
    encoder = StateEncoder(load_cepe(packaged_cepe()))
    build_index([corpus], corpus.parent / "idx", embedder=embedder, state_encoder=encoder)
    return str(corpus.parent / "idx")


@pytest.fixture(scope="module")
def rows(index_with_states):
    return [run_one(BenchConfig(method, k=2, answer_tokens=3, index=index_with_states))
            for method in METHODS] + [run_one(BenchConfig("concat", k=0, answer_tokens=3))]


def test_the_default_model_is_the_packaged_adapter_and_cross_layers_give_bare_cross_attention(index_with_states):
    from cepe_rag.bench.speed import build_models

    shipped, _, _ = build_models(BenchConfig("cepe", k=1))
    bare, _, _ = build_models(BenchConfig("cepe", k=1, cross_layers=2))
    assert shipped.pointer is not None and len(shipped.cross_attention_layers()) == 8
    assert bare.pointer is None and len(bare.cross_attention_layers()) == 2
    row = run_one(BenchConfig("cepe-stored", k=2, answer_tokens=3, cross_layers=2, index=index_with_states))
    assert row["ttft_s"] > 0 and row["decode_ms"] > 0


def test_every_method_measures_time_and_memory(rows):
    for row in rows:
        assert row["context_tokens"] == (0 if row["k"] == 0 else 256 if not row["method"].startswith("cepe-stored")
                                         else row["context_tokens"])
        assert row["ttft_s"] > 0 and row["decode_ms"] > 0 and row["tokens_per_s"] > 0
        assert row["memory_above_weights_mib"] >= 0
    stored = next(r for r in rows if r["method"] == "cepe-stored")
    assert 2 * 10 < stored["context_tokens"] < 2 * 40  # two real passages' MiniLM tokens, read from the index


def test_ratios_and_reports(rows, tmp_path):
    found = ratios(rows)
    cepe_rows = ("cepe", "cepe_precomputed", "cepe_absorbed", "cepe_stored", "cepe_stored_absorbed")
    expected = {f"k2_concat_over_{m}_ttft" for m in cepe_rows[1:]} | {
        "k2_absorbed_over_cached_decode", "k2_stored_absorbed_over_cached_decode"} | {
        f"k2_{m}_decode_over_no_context" for m in cepe_rows}
    assert expected <= set(found) and all("memory" in k for k in set(found) - expected)
    result = {"environment": {}, "rows": rows + [{"method": "concat", "k": 999, "context_tokens": 127872,
                                                  "skipped": "over --max-concat-tokens"}], "ratios": found}
    write_reports(result, tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["method"] == "cepe"
    table = (tmp_path / "bench.md").read_text()
    assert "| cepe-absorbed | 2 | 256 |" in table and "over --max-concat-tokens" in table
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_repeated_rows_report_the_median_of_the_runs_that_finished():
    from cepe_rag.bench.speed import _median_row

    def run(ttft, memory, decode=10.0, plain=None):  # as run_one reports it
        return {"method": "cepe", "k": 2, "context_tokens": 256, "ttft_s": ttft, "decode_ms": decode,
                "no_context_decode_ms": plain, "decode_over_no_context": decode / plain if plain else None,
                "tokens_per_s": 1.0, "memory_above_weights_mib": memory}

    failed = {"method": "cepe", "k": 2, "context_tokens": 256, "failed": "timeout after 1 s"}
    row = _median_row([run(3.0, 500), failed, run(1.0, 900), run(2.0, 600)])
    assert (row["ttft_s"], row["memory_above_weights_mib"], row["no_context_decode_ms"]) == (2.0, 600, None)
    assert len(row["runs"]) == 4 and row["runs"][1] == {"failed": "timeout after 1 s"}
    # decode over no context is paired within each run: (15/10, 40/20, 33/30) -> 1.5, not median 33 / median 20
    row = _median_row([run(1.0, 1, 15.0, 10.0), run(1.0, 1, 40.0, 20.0), run(1.0, 1, 33.0, 30.0)])
    assert row["decode_over_no_context"] == 1.5 and ratios([row])["k2_cepe_decode_over_no_context"] == 1.5
    assert _median_row([failed]) == failed and "runs" not in _median_row([run(1.0, 1)])
    assert _median_row([failed, {**failed, "failed": "out of memory"}])["runs"][0] == failed  # every reason kept
