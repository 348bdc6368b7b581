"""Speed and memory of the readers at growing context: time to first token, decode ms/token, tokens/s, memory.

Each (method, k) runs in a fresh subprocess so that its peak memory is its own: process RSS on CPU,
`torch.cuda.max_memory_allocated` on GPU, minus what the loaded models hold. Passages are random token
ids (speed does not depend on their content), 128 tokens each. The default model is SmolLM2-135M with the packaged
CEPE adapter as it ships (its 8 cross-attention layers, gate and copy pointer), fed what its reader feeds per request:
the passages' token ids for the pointer (the stored passages' own text, tokenized inside the timed request) and a
relevance-and-sentence prior over every context token plus the pointer's own prior (random values: the time does not
depend on them). With --cross-layers N it is bare cross-attention in the last N layers (the decoder's own attention
weights, no gate, pointer or prior): shapes only, for comparing layer counts.

Methods:
  cepe              encoder states computed on the fly, cross-attention K/V computed once
  cepe-precomputed  encoder states given (as an index would store them), K/V computed once
  cepe-absorbed     encoder states given, K/V never formed: attention reads the states through the projections
  cepe-stored       encoder states read from a real index on disk (`--index`, built with --context-states) inside
                    the timed request, K/V computed once
  cepe-stored-absorbed  as cepe-stored, K/V never formed (the reader's choice beyond --cross-kv-budget-mb)
  (concat at k=0 is the plain decoder with no context: the baseline for decode speed)
  parallel          training-free parallel encoding with the decoder (batched passage prefill)
  concat            everything in the prompt (one causal prefill)
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cepe_rag.cepe import CepeForCausalLM, build_encoder
from cepe_rag.cepe.checkpoints import ADAPTER_CONFIG, build_encoder_for, load_adapter
from cepe_rag.indexes import IndexStore
from cepe_rag.models import load_decoder
from cepe_rag.readers.cepe import combined_log_weights
from cepe_rag.readers.parallel import ParallelContext, ParallelReader
from cepe_rag.settings import BENCH_METHODS, packaged_cepe
from cepe_rag.types import CepeRagError

METHODS = BENCH_METHODS
PASSAGE_TOKENS = 128
QUESTION_TOKENS = 32


@dataclass
class BenchConfig:
    method: str
    k: int
    answer_tokens: int = 32
    model: str = "default"  # "default": SmolLM2-135M + its packaged adapter; "7b": LLaMA-2-7B shapes, random
    device: str = "cpu"
    dtype: str = "float32"
    cross_layers: int | None = None  # None: the packaged adapter's (default model) or every layer (7b)
    index: str | None = None  # cepe-stored: an index with stored context states


def _reset_peak_rss_mib() -> float:
    """The resident set now, after handing freed heap pages back (so that the base is what is live) and restarting
    the kernel's high-water mark from here (so that loading a model, e.g. float32 weights cast to bfloat16, does not
    count as the request's peak)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except (OSError, AttributeError):
        pass  # not glibc, or not Linux: the peak then counts from the process start
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_models(config: BenchConfig):
    """(CepeForCausalLM, vocab size): real default weights, or random 7B-shaped ones."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, config.dtype)
    if config.model == "7b":
        decoder_config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                     max_position_embeddings=4096)
        if config.device.startswith("cuda"):
            try:
                import flash_attn  # noqa: F401

                decoder_config._attn_implementation = "flash_attention_2"
            except ImportError:
                pass
        # Built directly in the target dtype: a float32 7B model would not fit next to a bf16 one.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(config.device):
                decoder = LlamaForCausalLM(decoder_config)
                encoder = build_encoder(LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                    num_attention_heads=16, num_key_value_heads=16, vocab_size=32001,
                                                    max_position_embeddings=512).to_dict())
        finally:
            torch.set_default_dtype(previous)
    elif config.cross_layers is None:  # what ships: the adapter's weights, gate and copy pointer
        model = load_adapter(packaged_cepe(), dtype=dtype, device=config.device)
        return model, model.decoder.config.vocab_size, model.encoder.config.vocab_size
    else:
        # The packaged adapter's encoder (its shapes decide the stored states and the cross-attention's K/V).
        decoder, tokenizer = load_decoder(device=config.device, dtype=dtype)
        card = json.loads((Path(packaged_cepe()) / ADAPTER_CONFIG).read_text())
        encoder, _ = build_encoder_for(card["encoder"], decoder, tokenizer)
        encoder = encoder.to(device=config.device, dtype=dtype)
    model = CepeForCausalLM(decoder.eval(), encoder.eval(), num_cross_attn_layers=config.cross_layers,
                            init_mode="copy").to(config.device).eval().requires_grad_(False)
    return model, decoder.config.vocab_size, encoder.config.vocab_size


def run_one(config: BenchConfig) -> dict:
    """Measure one method at one k in this process."""
    from transformers import DynamicCache

    torch.manual_seed(0)
    on_gpu = config.device.startswith("cuda")
    model, vocab, encoder_vocab = build_models(config)
    with torch.inference_mode():  # warm-up: first calls initialise kernels and allocator pools
        warm = torch.randint(0, min(vocab, encoder_vocab), (1, 8), device=config.device)
        states = model.encode_token_chunks(warm.tolist())
        model(input_ids=warm, cross_context=model.context_from_states([states], token_ids=[warm.tolist()]))
        model(input_ids=warm)
        del warm, states
    gc.collect()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _reset_peak_rss_mib()
    device = config.device
    question = torch.randint(0, vocab, (1, QUESTION_TOKENS), device=device)
    passages = torch.randint(0, vocab, (config.k, PASSAGE_TOKENS), device=device)
    encoder_passages = torch.randint(0, encoder_vocab, (config.k, PASSAGE_TOKENS), device=device)

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    precomputed = None
    stored = None
    if config.method.startswith("cepe-stored"):  # opened once per process, as a server would; read per request below
        store = IndexStore.open(config.index)
        if model.pointer is not None and store.context_states_stamp() != model.states_stamp():  # its ids must match
            raise CepeRagError(f"{config.index}: its context states were made by another encoder or chunking "
                               "(re-run `cepe-rag index --context-states`)")
        have = store.passage_ids_with_states()
        chosen = [have[i] for i in torch.randperm(len(have))[: config.k].tolist()]
        stored = (store, chosen, model.encoder.config.hidden_size)
        gc.collect()
        if not on_gpu:  # the open index (FAISS, SQLite pages) is the retriever's memory, held by every reader alike
            base = _reset_peak_rss_mib()
    if config.method in ("cepe-precomputed", "cepe-absorbed"):
        with torch.inference_mode():  # done at index time, outside the timed request
            precomputed = [list(model.encode_token_chunks(encoder_passages.tolist()))]
        gc.collect()
        if not on_gpu:
            base = _reset_peak_rss_mib()

    cache = DynamicCache(config=model.config)
    context_tokens = config.k * PASSAGE_TOKENS  # cepe-stored: the real passages' token counts, read below
    extra: dict = {}
    step_times: list[float] = []
    with torch.inference_mode():
        sync()
        started = time.perf_counter()
        if config.method.startswith("cepe-stored"):
            store, chosen, hidden = stored
            found = store.context_states(chosen, hidden)
            states = [[torch.from_numpy(found[i].copy()).to(device) for i in chosen]]
            del found
            context_tokens = sum(s.shape[-2] for s in states[0])
            if model.pointer is not None:  # the reader tokenizes the passages' text for the pointer, per request
                texts = store.passages(chosen)
                token_ids = [model.tokenize_chunks([texts[i].as_prompt_text() for i in chosen])]
        elif config.method.startswith("cepe"):
            states = precomputed or [list(model.encode_token_chunks(encoder_passages.tolist()))]
            token_ids = [encoder_passages.tolist()]
        if config.method.startswith("cepe"):
            extra["cross_context"] = model.context_from_states(
                states, cross_kv="absorb" if config.method.endswith("absorbed") else "cache",
                **(_reader_inputs(states[0], token_ids[0]) if model.pointer is not None else {}))
            del states  # as in the reader: the context holds what the request needs
            ids, positions = question, torch.arange(QUESTION_TOKENS, device=device)[None]
        elif config.method == "parallel":
            reader = ParallelReader(model.decoder, _NoTokenizer())
            merged = reader.encode_passages([1] * 16, passages.tolist())
            for layer, (keys, values) in enumerate(merged):
                cache.update(keys, values, layer)
            total = merged[0][0].shape[2]
            is_passage = torch.zeros((1, total), dtype=torch.bool, device=device)
            is_passage[:, 16:] = config.k > 1
            extra["parallel_context"] = ParallelContext(is_passage, 1.0, 0.6)
            offset = 16 + PASSAGE_TOKENS
            ids, positions = question, torch.arange(offset, offset + QUESTION_TOKENS, device=device)[None]
        elif config.method == "concat":
            ids = torch.cat([passages.reshape(1, -1), question], dim=-1)
            positions = torch.arange(ids.shape[1], device=device)[None]
        else:
            raise ValueError(f"unknown method {config.method!r}")
        out = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1, **extra)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        ttft = time.perf_counter() - started
        # The no-context decoder steps in turn with this method's, in this process: a ratio of the two is immune to
        # the machine's speed drifting between the subprocesses (it does, by 20-40% on a shared machine).
        plain_cache = DynamicCache(config=model.config)
        plain_out = model(input_ids=question, cache=plain_cache, use_cache=True, logits_to_keep=1)
        plain_token, plain_position = plain_out.logits[:, -1].argmax(-1, keepdim=True), QUESTION_TOKENS
        plain_times: list[float] = []
        position = int(positions[0, -1]) + 1
        for _ in range(config.answer_tokens - 1):
            step_started = time.perf_counter()
            out = model(input_ids=token, position_ids=torch.tensor([[position]], device=device), cache=cache,
                        use_cache=True, logits_to_keep=1, **extra)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            step_times.append(time.perf_counter() - step_started)
            position += 1
            step_started = time.perf_counter()
            plain_out = model(input_ids=plain_token, position_ids=torch.tensor([[plain_position]], device=device),
                              cache=plain_cache, use_cache=True, logits_to_keep=1)
            plain_token = plain_out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            plain_times.append(time.perf_counter() - step_started)
            plain_position += 1
    total_s = ttft + sum(step_times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else _peak_rss_mib()
    return {
        **asdict(config), "context_tokens": context_tokens, "ttft_s": ttft,
        "decode_ms": 1000 * statistics.median(step_times) if step_times else None,
        "no_context_decode_ms": 1000 * statistics.median(plain_times) if plain_times else None,
        "decode_over_no_context": (round(statistics.median(step_times) / statistics.median(plain_times), 3)
                                   if step_times and plain_times else None),
        "tokens_per_s": config.answer_tokens / total_s, "memory_above_weights_mib": max(0.0, peak - base),
    }


def _reader_inputs(states: list[torch.Tensor], token_ids: list[list[int]]) -> dict:
    """What the packaged adapter's reader adds to a request's context: the tokens for the copy pointer, a relevance
    weight per passage plus a sentence weight per token (one prior over every context token), and the pointer's own
    prior per token (the question-name penalty). Random values: the time does not depend on them."""
    relevance = torch.log_softmax(torch.randn(len(states)) / 0.01, dim=0).tolist()
    sentences = [torch.log_softmax(torch.randn(s.shape[-2]) / 0.03, dim=0).tolist() for s in states]
    copy = [(-10.0 * (torch.rand(s.shape[-2]) < 0.05)).tolist() for s in states]
    return {"token_ids": [token_ids], "chunk_log_weights": [combined_log_weights(relevance, sentences)],
            "copy_log_weights": [copy]}


class _NoTokenizer:
    """ParallelReader.encode_passages only needs the model; benchmarks feed token ids directly."""

    pad_token_id = 0
    chat_template = None


def environment(device: str, dtype: str) -> dict:
    import transformers

    info = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device": device, "dtype": dtype}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_all(methods: list[str], ks: list[int], *, model: str = "default", device: str = "cpu",
            dtype: str = "float32", answer_tokens: int = 32, max_concat_tokens: int = 16384,
            max_parallel_k: int = 500, timeout_s: int = 1800, cross_layers: int | None = None,
            index: str | None = None, repeats: int = 1, log=print) -> dict:
    """Every (method, k) in its own subprocess, `repeats` rounds of all of them (so that a slow spell of the machine
    touches every row alike), each figure the median over the rounds; failures (out of memory, timeout) are
    recorded, not fatal."""
    rows: list[dict] = []
    configs: list[tuple[int, BenchConfig]] = []
    for k in ks:
        for method in methods:
            skipped = (f"over --max-concat-tokens {max_concat_tokens}" if method == "concat" and
                       k * PASSAGE_TOKENS > max_concat_tokens else
                       f"over --max-parallel-k {max_parallel_k}" if method == "parallel" and k > max_parallel_k else
                       "no --index given" if method.startswith("cepe-stored") and not index else None)
            if k == 0 and method != "concat":
                continue  # no context: the plain decoder, measured once (as concat)
            if skipped:
                rows.append({"method": method, "k": k, "context_tokens": k * PASSAGE_TOKENS, "skipped": skipped})
                continue
            config = BenchConfig(method, k, answer_tokens, model, device, dtype, cross_layers, index)
            configs.append((len(rows), config))
            rows.append({})
    runs: dict[int, list[dict]] = {position: [] for position, _ in configs}
    for _ in range(repeats):
        for position, config in configs:
            row = _run_subprocess(config, timeout_s)
            runs[position].append(row)
            log(_format_row(row))
    for position, found in runs.items():
        rows[position] = _median_row(found)
    return {"environment": environment(device, dtype), "model": model, "passage_tokens": PASSAGE_TOKENS,
            "cross_layers": cross_layers, "index": index, "answer_tokens": answer_tokens, "repeats": repeats,
            "rows": rows, "ratios": ratios(rows)}


def _run_subprocess(config: BenchConfig, timeout_s: int) -> dict:
    failed = {"method": config.method, "k": config.k, "context_tokens": config.k * PASSAGE_TOKENS}
    try:
        done = subprocess.run([sys.executable, "-m", "cepe_rag.bench.speed", json.dumps(asdict(config))],
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**failed, "failed": f"timeout after {timeout_s} s"}
    if done.returncode != 0:
        return {**failed, "failed": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# decode_over_no_context is paired within each run's process: its median is not a ratio of the medians, which
# would pair figures from different processes again.
MEASURED = ("ttft_s", "decode_ms", "no_context_decode_ms", "decode_over_no_context", "tokens_per_s",
            "memory_above_weights_mib")


def _median_row(runs: list[dict]) -> dict:
    """The median of every figure over the successful runs; with several, each run's figures under "runs"."""
    done = [run for run in runs if "ttft_s" in run]
    if not done:
        return {**runs[-1], "runs": runs} if len(runs) > 1 else runs[-1]
    row = dict(done[0])
    for name in MEASURED:
        values = [run[name] for run in done if run.get(name) is not None]
        row[name] = statistics.median(values) if values else None
    if len(runs) > 1:
        row["runs"] = [{name: run.get(name) for name in (*MEASURED, "failed") if name in run} for run in runs]
    return row


def ratios(rows: list[dict]) -> dict:
    """Same-run ratios: concat over each stored-states CEPE row (TTFT, memory) at every k where both ran, and
    each CEPE row's decode ms/token over the no-context decoder's, timed in turn with it in the same process."""
    by_key = {(r["method"], r["k"]): r for r in rows if "ttft_s" in r}
    out = {}
    for (method, k), row in by_key.items():
        for stored_as in ("cepe-precomputed", "cepe-absorbed", "cepe-stored", "cepe-stored-absorbed"):
            cepe = by_key.get((stored_as, k))
            if method != "concat" or not cepe:
                continue
            name = stored_as.replace("-", "_")
            out[f"k{k}_concat_over_{name}_ttft"] = round(row["ttft_s"] / cepe["ttft_s"], 2)
            if cepe["memory_above_weights_mib"] > 0:
                out[f"k{k}_concat_over_{name}_memory"] = round(
                    row["memory_above_weights_mib"] / cepe["memory_above_weights_mib"], 2)
        if method.startswith("cepe") and row.get("decode_over_no_context"):
            name = method.replace("-", "_")
            out[f"k{k}_{name}_decode_over_no_context"] = round(row["decode_over_no_context"], 2)
        # Each row's decode over the no-context decode of its own process, then the two ratios: drift-free.
        for absorbed, cached, name in (("cepe-absorbed", "cepe-precomputed", "absorbed"),
                                       ("cepe-stored-absorbed", "cepe-stored", "stored_absorbed")):
            cepe = by_key.get((cached, k))
            if method == absorbed and cepe and row.get("decode_over_no_context") and \
                    cepe.get("decode_over_no_context"):
                out[f"k{k}_{name}_over_cached_decode"] = round(
                    row["decode_over_no_context"] / cepe["decode_over_no_context"], 2)
    return out


def _format_row(row: dict) -> str:
    if "ttft_s" not in row:
        reason = row.get("skipped") or row.get("failed")
        return f"| {row['method']} | {row['k']} | {row['context_tokens']} | {reason} | | | | |"

    def ms(value):
        return f"{value:.1f}" if value is not None else "–"

    return (f"| {row['method']} | {row['k']} | {row['context_tokens']} | {row['ttft_s']:.2f} | "
            f"{ms(row['decode_ms'])} | {ms(row.get('no_context_decode_ms'))} | {row['tokens_per_s']:.2f} | "
            f"{row['memory_above_weights_mib']:.0f} |")


TABLE_HEADER = ("| method | k | context tokens | time to first token (s) | decode ms/token "
                "| no-context decode ms/token (same process, in turn) | tokens/s (32-token answer) "
                "| memory above weights (MiB) |\n"
                "|---|---|---|---|---|---|---|---|")


def write_reports(result: dict, out_dir) -> None:
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    lines = [TABLE_HEADER] + [_format_row(r) for r in result["rows"]]
    lines += ["", "| ratio (same run) | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in result["ratios"].items()]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        points = sorted((r["context_tokens"], r["ttft_s"], r["memory_above_weights_mib"])
                        for r in result["rows"] if r["method"] == method and "ttft_s" in r)
        if points:
            x, ttft, memory = zip(*points)
            left.plot(x, ttft, marker="o", label=method)
            right.plot(x, [max(m, 1) for m in memory], marker="o", label=method)
    for axis, label in ((left, "time to first token (s)"), (right, "memory above weights (MiB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("context tokens")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "bench.png", dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    print(json.dumps(run_one(BenchConfig(**json.loads(sys.argv[1])))))
