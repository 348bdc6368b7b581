"""Where models come from: first-run conversion of the packaged decoder, CPU capability checks."""

from pathlib import Path

import pytest

from cepe_rag.models import cpu_has_fast_bfloat16, publish_folder


def folder_with(path, files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_a_conversion_that_loses_the_race_uses_the_winners_folder(tmp_path):
    target = folder_with(tmp_path / "model", {"config.json": '{"winner": true}'})
    publish_folder(folder_with(tmp_path / ".convert-1", {"config.json": '{"winner": false}'}), target)
    assert (target / "config.json").read_text() == '{"winner": true}'  # no error: the finished folder is kept


def test_publishing_onto_a_half_written_folder_still_fails(tmp_path):
    target = folder_with(tmp_path / "model", {"stray": ""})
    with pytest.raises(OSError):
        publish_folder(folder_with(tmp_path / ".convert-1", {"config.json": "{}"}), target)


@pytest.mark.parametrize("flags, expected", [("fpu avx2 avx512f amx_bf16 amx_tile", True),
                                             ("fpu avx2 avx512f avx512_bf16", True),
                                             ("fpu avx2 fma (an AMD EPYC without AVX-512)", False)])
def test_fast_bfloat16_detection_reads_the_cpu_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cpu_has_fast_bfloat16(cpuinfo) is expected
    assert cpu_has_fast_bfloat16(tmp_path / "missing") is None


def test_the_default_dtype_follows_cepe_rag_dtype(monkeypatch):
    """`make test-isa` gives the tests the dtype an emulated CPU would default to: the flags in /proc/cpuinfo do not
    change with the kernel caps."""
    import torch

    from cepe_rag.models import resolve_dtype
    from cepe_rag.types import CepeRagError

    monkeypatch.setenv("CEPE_RAG_DTYPE", "float32")
    assert resolve_dtype(None, "cpu") is torch.float32 and resolve_dtype(None, "cuda") is torch.float32
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16  # --dtype (or dtype=) still wins
    monkeypatch.setenv("CEPE_RAG_DTYPE", "bfloat16")
    assert resolve_dtype(None, "cpu") is torch.bfloat16
    monkeypatch.setenv("CEPE_RAG_DTYPE", "float64")
    with pytest.raises(CepeRagError, match="unknown dtype \\(environment variable CEPE_RAG_DTYPE\\) 'float64'"):
        resolve_dtype(None, "cpu")
    monkeypatch.setenv("CEPE_RAG_DTYPE", "")  # empty: unset
    assert resolve_dtype(None, "cpu") is (torch.bfloat16 if cpu_has_fast_bfloat16() else torch.float32)


def test_query_embedder_gives_the_sentence_transformers_vectors():
    from cepe_rag.models import MeanPoolingEmbedder, embedder_path, load_embedder, load_query_embedder

    texts = ["Who directed 2001: A Space Odyssey?", "a", "word " * 400]  # the last one is truncated at 256 tokens
    light = load_query_embedder()
    assert isinstance(light, MeanPoolingEmbedder)
    expected = load_embedder().encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    got = light.encode(texts, batch_size=2)
    assert got.shape == expected.shape == (3, 384)
    assert abs(got - expected).max() < 1e-5
    assert not MeanPoolingEmbedder.supports(Path(embedder_path()).parent)  # not a sentence-transformers folder


@pytest.mark.real_models
def test_two_concurrent_first_runs_both_get_the_converted_decoder(tmp_path):
    """An empty model cache and two processes converting the packaged GGUF decoder at once."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CEPE_RAG_CACHE": str(tmp_path / "cache")}
    code = "from cepe_rag.models import decoder_path; print(decoder_path())"
    processes = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in processes]
    for stdout, stderr, returncode in results:
        assert returncode == 0, stderr
        assert (Path(stdout.strip()) / "config.json").exists()
    leftovers = [p.name for p in (tmp_path / "cache" / "models").iterdir() if p.name.startswith(".convert-")]
    assert leftovers == []
