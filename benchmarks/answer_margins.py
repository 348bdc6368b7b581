"""How firmly the packaged 135M decoder gives the answers the real-model tests assert (issue 29).

Every case goes through the same code path as its test (LangChain adapters, the command line in-process, the
CEPE reader), with `_next_tokens` wrapped to record each greedy step's two best logits. `min_gap`: the smallest
top-2 logit gap up to the step that completes the asserted text. Then the case is re-run with the runner-up
forced at each step closer than --margin (2 nats), greedy after it: `decisive_margin` is the smallest gap whose
runner-up loses the asserted text (">= 2.0": none does). Below ~2 nats another CPU's kernels or bfloat16 can flip
the answer. For a non-empty check (LangChain's standard suites) the margin is the first step's best
non-end-of-sequence logit minus the end-of-sequence one.

    python benchmarks/answer_margins.py [--dtype float32,bfloat16] [--only CASE,...] [--out margins.json]

Run it under other kernels as `make test-isa` does, e.g. ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import cepe_rag.readers.generation as generation  # noqa: E402

STEPS: list[list[tuple[int, int, float, float]]] = []  # per step, per row: (best, runner-up, gap, best - EOS)
_EOS: set[int] = set()
FORCE: dict[int, int] = {}  # step -> token: the runner-up taken instead of the best, to see where it leads
_next_tokens = generation._next_tokens


def _recording(logits, config, generator):
    values, indices = logits.float().topk(2, dim=-1)
    eos = torch.tensor(sorted(_EOS))
    masked = logits.float().clone()
    masked[:, eos] = -float("inf")
    non_eos_gap = (masked.max(-1).values - logits.float()[:, eos].max(-1).values).tolist()
    STEPS.append([(int(i[0]), int(i[1]), float(v[0] - v[1]), g) for v, i, g in zip(values, indices, non_eos_gap)])
    tokens = _next_tokens(logits, config, generator)
    if len(STEPS) - 1 in FORCE:
        tokens = torch.full_like(tokens, FORCE[len(STEPS) - 1])
    return tokens


generation._next_tokens = _recording

QUESTION = "Who directed 2001: A Space Odyssey?"


def small_index() -> str:
    from tests.integrations.test_langchain_standard import small_index as build

    return build()


def cli(*args) -> str:
    from cepe_rag.cli.app import app

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            app([str(a) for a in args], standalone_mode=False)
        except SystemExit:
            pass
    return out.getvalue()


@functools.cache
def _corpus(files: tuple[tuple[str, str], ...]) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="cepe-margins-"))
    (folder / "docs").mkdir()
    for name, text in files:
        (folder / "docs" / name).write_text(text)
    cli("index", folder / "docs", "--index", folder / "idx")
    return folder / "idx"


def corpus(files: dict[str, str]) -> Path:
    return _corpus(tuple(sorted(files.items())))


def cases(dtype: str):
    """(name, the test it mirrors, what is asserted, a function running it)."""
    from langchain_core.documents import Document
    from langchain_core.vectorstores import InMemoryVectorStore

    from cepe_rag.integrations.langchain import CepeLLM, CepeRetriever, ChatCepe, rag_chain
    from tests.integrations.test_langchain_chains import FILM

    # Cases marked "before issue 29" are the answers the tests asserted then; they now check the plumbing instead.
    film = [Document(page_content="2001: A Space Odyssey is a 1968 film directed by Stanley Kubrick.",
                     metadata={"title": "2001: A Space Odyssey"})]
    yield ("llm_film_file", "test_contexts_reach_the_reader_not_the_prompt (FILM, 32 tokens)", "Kubrick",
           lambda: CepeLLM(max_tokens=32, dtype=dtype).invoke(QUESTION, contexts=FILM))
    yield ("llm_contexts", "before issue 29: test_langchain_chains generate/invoke/stream/astream", "Kubrick",
           lambda: CepeLLM(max_tokens=16, dtype=dtype).invoke(QUESTION, contexts=film))
    yield ("llm_from_index", "before issue 29: test_llm_retrieves_for_itself_when_given_a_retriever", "Kubrick",
           lambda: CepeLLM.from_index(small_index(), k=1, max_tokens=16, dtype=dtype).invoke(QUESTION))
    yield ("rag_chain", "before issue 29: test_rag_chain_returns_answer_and_sources", "Kubrick",
           lambda: rag_chain(CepeRetriever(index=small_index(), k=1), CepeLLM(max_tokens=16, dtype=dtype))
           .invoke(QUESTION)["answer"])

    def vector_store():
        from cepe_rag.models import load_embedder

        embedder = load_embedder()

        class MiniLM:
            def embed_documents(self, texts):
                return embedder.encode(texts, normalize_embeddings=True).tolist()

            def embed_query(self, text):
                return self.embed_documents([text])[0]

        store = InMemoryVectorStore(MiniLM())
        store.add_texts(["Stanley Kubrick directed 2001: A Space Odyssey.", "Otters hold hands while sleeping."])
        llm = CepeLLM(retriever=store.as_retriever(search_kwargs={"k": 1}), max_tokens=16, dtype=dtype)
        return llm.invoke(QUESTION)

    yield ("vector_store", "before issue 29: test_any_vector_store_retriever_is_a_passage_source", "Kubrick",
           vector_store)
    yield ("chat_stream", "before issue 29: test_chat_model_streams_chunks_with_contexts", "Kubrick",
           lambda: "".join(c.content for c in ChatCepe(max_tokens=16, dtype=dtype).stream(
               [("system", "Answer briefly."), ("human", QUESTION)], contexts=film)))
    for name, messages in [("hello", "Hello"), ("hey", "Hey"),
                           ("conversation", [("human", "hello"), ("ai", "hello"), ("human", "how are you")]),
                           ("double_conversation", [("system", "hello"), ("system", "hello"), ("human", "hello"),
                                                    ("human", "hello"), ("ai", "hello"), ("ai", "hello"),
                                                    ("human", "how are you")])]:
        yield (f"standard_{name}", "test_langchain_standard: non-empty content", None,
               lambda messages=messages: ChatCepe(max_tokens=16, dtype=dtype).invoke(messages).content)

    kubrick = {"film.txt": "2001: A Space Odyssey is a 1968 science fiction film directed by Stanley Kubrick.",
               "tower.txt": "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889."}
    yield ("cli_ask_json", "test_cli: test_ask_answers_with_sources_as_json (--k 1)", "Kubrick",
           lambda: json.loads(cli("ask", QUESTION, "--index", corpus(kubrick), "--k", "1", "--json",
                                  "--dtype", dtype))["text"])
    qdrant_like = {"film.txt": "2001: A Space Odyssey is a 1968 film directed by Stanley Kubrick.",
                   "tower.txt": kubrick["tower.txt"]}
    yield ("cli_qdrant_passages", "test_cli: test_a_qdrant_index_through_the_command_line (same passages, FAISS)",
           "Kubrick", lambda: json.loads(cli("ask", QUESTION, "--index", corpus(qdrant_like), "--k", "1", "--json",
                                             "--dtype", dtype))["text"])
    yield ("cli_closed_book", "test_cli: test_closed_book_reader", "Paris",
           lambda: json.loads(cli("ask", "What is the capital of France?", "--index", corpus(kubrick), "--reader",
                                  "closed-book", "--json", "--max-new-tokens", "16", "--dtype", dtype))["text"])
    quorvath = {  # as in the test
        "quorvath-bridge.md": "# Quorvath Bridge\n\nThe Quorvath Bridge is a stone arch bridge over the river Dunn "
                              "in Velmarra. It was designed by the engineer Maria Tollund and opened in 1927.\n",
        "quorvath-tower.md": "# Quorvath Tower\n\nThe Quorvath Tower is a clock tower in Velmarra, built in 1903 by "
                             "the architect Henrik Solberg.\n",
        "harbour-museum.md": "# Velmarra Harbour Museum\n\nThe Velmarra Harbour Museum was founded by Dr. Elena Kass "
                             "in 1961 and holds ship models and old charts.\n"}
    yield ("cli_quorvath", "test_cli: test_default_settings_answer_from_the_users_own_documents", "Maria Tollund",
           lambda: json.loads(cli("ask", "Who designed the Quorvath Bridge?", "--index", corpus(quorvath), "--json",
                                  "--dtype", dtype))["text"])

    def packaged(with_passages: bool):
        from cepe_rag.cepe import load_cepe
        from cepe_rag.readers import GenerationConfig, make_reader
        from cepe_rag.settings import packaged_cepe
        from tests.training.test_packaged_checkpoint import PASSAGES

        model = load_cepe(packaged_cepe(), dtype=getattr(torch, dtype))
        reader = make_reader("cepe", model, model.decoder_tokenizer, generation=GenerationConfig(max_new_tokens=12))
        return reader.answer("When was the Eiffel Tower completed?", PASSAGES if with_passages else []).text

    yield ("cepe_adapter", "before issue 29: test_packaged_checkpoint == '1889'", "1889", lambda: packaged(True))
    yield ("cepe_adapter_closed", "before issue 29: test_packaged_checkpoint, '1889' not without passages", "!1889",
           lambda: packaged(False))


def analyse(tokenizer, steps, target, text):
    tokens = [step[0][0] for step in steps]
    row = {"steps": len(steps), "first_step_non_eos_margin": round(steps[0][0][3], 2), "holds": holds(target, text)}
    end = len(steps)
    if target is not None and not target.startswith("!"):
        found = [i for i in range(len(tokens)) if target in tokenizer.decode(tokens[: i + 1], skip_special_tokens=True)]
        end = found[0] + 1 if found else len(steps)
    gaps = [(steps[i][0][2], i) for i in range(end)]
    gap, at = min(gaps)
    row.update(min_gap=round(gap, 2), min_gap_step=at, best=tokenizer.decode([steps[at][0][0]]),
               runner_up=tokenizer.decode([steps[at][0][1]]),
               gaps=[round(g, 2) for g, _ in gaps])
    return row


def holds(target: str | None, text: str) -> bool:
    if target is None:
        return bool(text.strip())
    return target[1:] not in text if target.startswith("!") else target in text


def branches(tokenizer, run, steps, row, target, margin):
    """Re-run with the runner-up forced at each step closer than `margin` (up to where the asserted text is
    complete, or the first step for a non-empty check): does the asserted text still come out?"""
    if target is None:  # non-empty: only an end of sequence at the first step empties the answer
        weak = [0] if row["first_step_non_eos_margin"] < margin else []
    else:
        weak = [i for i, gap in enumerate(row["gaps"]) if gap < margin]
    outcomes = []
    for step in weak:
        FORCE.clear()
        FORCE[step] = steps[step][0][1]
        STEPS.clear()
        text = run()
        FORCE.clear()
        outcomes.append({"step": step, "gap": row["gaps"][step], "forced": tokenizer.decode([steps[step][0][1]]),
                         "answer": text, "holds": holds(target, text)})
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--margin", type=float, default=2.0, help="re-run with the runner-up below this gap")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from cepe_rag.models import decoder_path

    tokenizer = AutoTokenizer.from_pretrained(decoder_path())
    _EOS.update(generation._eos_ids(tokenizer))
    only = {name for name in args.only.split(",") if name}
    results = []
    for dtype in args.dtype.split(","):
        for name, test, target, run in cases(dtype):
            if only and name not in only:
                continue
            STEPS.clear()
            text = run()
            steps = list(STEPS)
            row = {"case": name, "dtype": dtype, "test": test, "asserted": target, "answer": text,
                   **analyse(tokenizer, steps, target, text)}
            row["branches"] = branches(tokenizer, run, steps, row, target, args.margin)
            # The margin that matters: the closest step whose runner-up breaks the check (none below --margin: ok).
            breaking = [b["gap"] for b in row["branches"] if not b["holds"]]
            row["decisive_margin"] = min(breaking) if breaking else f">= {args.margin}"
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("gaps", "branches")}), flush=True)
            for branch in row["branches"]:
                print("   runner-up", json.dumps(branch), flush=True)
    environment = {"aten": torch.backends.cpu.get_cpu_capability(),
                   **{v: os.environ.get(v) for v in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "CEPE_RAG_DTYPE")}}
    if args.out:
        args.out.write_text(json.dumps({"environment": environment, "cases": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
