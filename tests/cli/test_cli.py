"""The command line on the real packaged models: one-line errors for bad input, answers with sources."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.real_models


# Where an answer's content is asserted, the ask runs in float32 (`--dtype float32`), on a question and passage
# where every runner-up token within 2 nats of the best still gives the asserted word (issue 29; measured with
# `python benchmarks/answer_margins.py`, docs/tests.md): bfloat16's rounding, or another CPU's kernels, can flip a
# closer decision.


def run_cli(*args, cwd=None):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "cepe_rag", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def assert_one_line_error(result, fragment):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), result.stderr
    assert fragment in " ".join(lines), result.stderr


@pytest.fixture(scope="module")
def kubrick_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "film.txt").write_text("2001: A Space Odyssey is a 1968 science fiction film directed by "
                                     "Stanley Kubrick.")
    (corpus / "tower.txt").write_text("The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889.")
    (corpus / "bad.txt").write_bytes(b"\x00\x00binary")
    result = run_cli("index", corpus, "--index", root / "idx")
    assert result.returncode == 0, result.stderr
    assert "2 embedded" in result.stderr and "1 skipped" in result.stderr
    assert "bad.txt: binary file" in result.stderr
    return root / "idx"


def test_ask_answers_with_sources_as_json(kubrick_index):
    result = run_cli("ask", "Who directed 2001: A Space Odyssey?", "--index", kubrick_index, "--k", "1", "--json",
                     "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert "Kubrick" in answer["text"]  # "The film is directed by Stanley Kubrick.", robustly (see run_cli)
    assert answer["passages"][0]["source"].endswith("film.txt")
    assert answer["reader"] == "concat"  # the default: it reads the user's documents (docs/benchmarks.md, "Readers")
    assert {"retrieval_s", "first_token_s", "total_s"} <= set(answer["timings"])


def test_default_settings_answer_from_the_users_own_documents(tmp_path):
    """A fact that exists only in the indexed files, next to a near-namesake and a distractor with another name."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "quorvath-bridge.md").write_text(
        "# Quorvath Bridge\n\nThe Quorvath Bridge is a stone arch bridge over the river Dunn in Velmarra. It was "
        "designed by the engineer Maria Tollund and opened in 1927.\n")
    (docs / "quorvath-tower.md").write_text(
        "# Quorvath Tower\n\nThe Quorvath Tower is a clock tower in Velmarra, built in 1903 by the architect "
        "Henrik Solberg.\n")
    (docs / "harbour-museum.md").write_text(
        "# Velmarra Harbour Museum\n\nThe Velmarra Harbour Museum was founded by Dr. Elena Kass in 1961 and holds "
        "ship models and old charts.\n")
    assert run_cli("index", docs, "--index", tmp_path / "idx").returncode == 0
    result = run_cli("ask", "Who designed the Quorvath Bridge?", "--index", tmp_path / "idx", "--json", "--dtype",
                     "float32")  # the answer is asserted: not on one CPU's bfloat16 rounding
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert "Maria Tollund" in answer["text"]
    assert answer["passages"][0]["source"].endswith("quorvath-bridge.md")
    assert answer["passages"][0]["title"] == "Quorvath Bridge"
    assert answer["usage"] == {**answer["usage"], "passages_read": 1, "passages_retrieved": 3}  # the cutoff


def test_abstains_on_what_the_documents_do_not_mention_and_filters_by_source(kubrick_index):
    result = run_cli("ask", "Who painted the Quorvath goat mascot?", "--index", kubrick_index, "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["text"] == "The documents do not contain the answer to this question."
    assert answer["abstained"].startswith("the best passage's similarity to the question is")
    assert answer["usage"]["decode_steps"] == 0 and len(answer["passages"]) == 2  # sources still listed
    assert all(p["dense_score"] < 0.68 for p in answer["passages"])
    forced = run_cli("ask", "Who painted the Quorvath goat mascot?", "--index", kubrick_index, "--no-abstain",
                     "--json", "--max-new-tokens", "8")
    assert json.loads(forced.stdout)["abstained"] is None
    only_tower = run_cli("ask", "Who directed 2001: A Space Odyssey?", "--index", kubrick_index, "--source",
                         "*tower.txt", "--retrieval", "lexical", "--json", "--max-new-tokens", "8")
    assert only_tower.returncode == 0, only_tower.stderr
    assert [p["source"].rsplit("/", 1)[-1] for p in json.loads(only_tower.stdout)["passages"]] == []
    assert_one_line_error(run_cli("ask", "Who?", "--index", kubrick_index, "--source", "*.pdf"),
                          "no passage matches --source '*.pdf'")


def test_ask_streams_answer_then_sources(kubrick_index):
    result = run_cli("ask", "Who directed 2001: A Space Odyssey?", "--index", kubrick_index, "--k", "5")
    assert result.returncode == 0, result.stderr
    assert "Sources" in result.stdout and "film.txt" in result.stdout
    assert "--k 5 is more than the 2 passages" in result.stderr


def test_closed_book_reader(kubrick_index):
    result = run_cli("ask", "What is the capital of France?", "--index", kubrick_index, "--reader", "closed-book",
                     "--json", "--max-new-tokens", "16", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["reader"] == "closed-book" and answer["passages"] == []
    assert "Paris" in answer["text"]
    shown = run_cli("ask", "What is the capital of France?", "--index", kubrick_index, "--reader", "closed-book",
                    "--max-new-tokens", "16")
    assert shown.returncode == 0, shown.stderr
    assert "Sources" not in shown.stdout and "k=" not in shown.stderr and "more than the" not in shown.stderr


@pytest.mark.parametrize("args,fragment", [
    (["--k", "0"], "--k must be at least 1"), (["--k", "-1"], "--k must be at least 1"),
    (["--reader", "fid"], "unknown reader 'fid'"), (["--prompt", "poem"], "unknown prompt style 'poem'"),
    (["--dtype", "int3"], "unknown dtype 'int3'"), (["--retrieval", "fuzzy"], "unknown retrieval mode 'fuzzy'"),
    (["--reader", "cepe", "--cepe-model", "/tmp/nope-not-here"],
     "CEPE checkpoint '/tmp/nope-not-here': no such folder"),
])
def test_bad_options_fail_before_any_model_loads(args, fragment, tmp_path):
    # No index is needed to reject them: the options are checked first.
    assert_one_line_error(run_cli("ask", "anything?", "--index", tmp_path / "none", *args), fragment)


def test_a_documents_folder_given_as_index_gets_the_right_advice(tmp_path):
    (tmp_path / "notes.txt").write_text("some notes")
    result = run_cli("ask", "anything?", "--index", tmp_path)
    assert_one_line_error(result, f"is not a cepe-rag index (no manifest.json); to search the documents in it, "
                                  f"index them first: `cepe-rag index {tmp_path} --index indexes/NAME`")


def test_a_corpus_that_will_not_fit_is_refused_in_one_line(tmp_path):
    (tmp_path / "docs").mkdir()
    with (tmp_path / "docs" / "huge.txt").open("wb") as handle:
        handle.truncate(200 * 2**30)  # sparse: 200 GiB to the estimate, no disk used
    result = run_cli("index", tmp_path / "docs", "--index", tmp_path / "idx")
    assert_one_line_error(result, "this run needs ~")
    assert "passages from 200.0 GiB of files" in result.stderr and "--force" in result.stderr
    assert not (tmp_path / "idx").exists()  # refused before the writer's lock (and any model): nothing created
    assert_one_line_error(run_cli("index", tmp_path / "nope", "--index", tmp_path / "idx"), "source not found")


def test_invalid_faiss_factory_is_refused_before_embedding(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("text")
    result = run_cli("index", tmp_path / "docs", "--index", tmp_path / "idx", "--faiss", "NotAFactory")
    assert_one_line_error(result, "invalid faiss factory string 'NotAFactory'")
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("question,fragment", [("", "question is empty"), ("   ", "question is empty"),
                                               ("why" * 33_334, "100,002 characters")])
def test_bad_questions(kubrick_index, question, fragment):
    assert_one_line_error(run_cli("ask", question, "--index", kubrick_index), fragment)


def test_question_longer_than_the_window(kubrick_index):
    # Reserving 8,000 of the 8,192-token window for the answer leaves less than this question needs.
    question = "word " * 300 + "?"
    result = run_cli("ask", question, "--index", kubrick_index, "--k", "1", "--max-new-tokens", "8000")
    assert_one_line_error(result, "prompt tokens; this decoder reads at most 192")


def test_ask_without_index(tmp_path):
    assert_one_line_error(run_cli("ask", "anything?", "--index", tmp_path / "none"), "no index at")


def test_ask_against_an_empty_index(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text("soon deleted")
    assert run_cli("index", corpus, "--index", tmp_path / "idx").returncode == 0
    (corpus / "a.txt").unlink()
    (corpus / "b.txt").write_bytes(b"\x00binary")
    run_cli("index", corpus, "--index", tmp_path / "idx")
    assert_one_line_error(run_cli("ask", "anything?", "--index", tmp_path / "idx"), "is empty")


def test_index_bad_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_cli("index", tmp_path / "empty", "--index", tmp_path / "i1"), "no readable documents")
    assert_one_line_error(run_cli("index", tmp_path / "missing", "--index", tmp_path / "i2"), "source not found")
    assert_one_line_error(run_cli("index", "--index", tmp_path / "i3"), "at least one SOURCE")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("text")
    assert_one_line_error(run_cli("index", tmp_path / "c", "--index", tmp_path / "i4", "--faiss", "Nonsense99"),
                          "invalid faiss factory")
    assert_one_line_error(run_cli("ask", "q?", "--index", tmp_path / "c", "--reader", "nope"), "unknown reader 'nope'")
    assert_one_line_error(run_cli("ask", "q?", "--index", tmp_path / "c"), "is not a cepe-rag index")


def test_a_qdrant_index_through_the_command_line(kubrick_index, tmp_path):
    """`--store qdrant` in Qdrant's embedded mode: index, ask through the folder alone, copy
    an index without re-embedding it, and one-line errors."""
    pytest.importorskip("qdrant_client")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "film.txt").write_text("2001: A Space Odyssey is a 1968 film directed by Stanley Kubrick.")
    (corpus / "tower.txt").write_text("The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889.")
    index = tmp_path / "idx"
    result = run_cli("index", corpus, "--index", index, "--store", "qdrant")
    assert result.returncode == 0 and "2 embedded" in result.stderr, result.stderr
    assert json.loads((index / "manifest.json").read_text())["qdrant"] == {"path": "qdrant", "collection": "idx"}

    result = run_cli("ask", "Who directed 2001: A Space Odyssey?", "--index", index, "--k", "1", "--json", "--dtype",
                     "float32")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert "Kubrick" in answer["text"] and answer["passages"][0]["source"].endswith("film.txt")
    assert answer["passages"][0]["dense_score"] > 0.5 and answer["passages"][0]["lexical_score"] is None
    assert "no BM25 index: searching densely" in result.stderr

    copied = run_cli("index", "--from-index", kubrick_index, "--index", tmp_path / "copy", "--qdrant-path",
                     tmp_path / "store", "--qdrant-collection", "films")
    assert copied.returncode == 0 and "2 copied" in copied.stderr, copied.stderr

    assert_one_line_error(run_cli("ask", "Who?", "--index", index, "--retrieval", "lexical"), "no lexical (BM25)")
    assert_one_line_error(run_cli("ask", "Who?", "--index", index, "--qdrant-url", "http://127.0.0.1:9"),
                          "Qdrant at http://127.0.0.1:9")
    assert_one_line_error(run_cli("index", corpus, "--index", index, "--store", "faiss"), "is a qdrant index")
    assert_one_line_error(run_cli("index", corpus, "--index", kubrick_index, "--store", "qdrant"), "is a faiss index")
    assert_one_line_error(run_cli("docs", "list", "--index", index), "keeps its passages in Qdrant")


def test_ask_with_a_cepe_checkpoint(kubrick_index, tmp_path, chat_tokenizer):
    """A (tiny, random) checkpoint in the released layout loads from disk and answers through the CLI."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from cepe_rag.cepe import CepeForCausalLM
    from cepe_rag.models import embedder_path

    torch.manual_seed(0)
    decoder = LlamaForCausalLM(LlamaConfig(vocab_size=len(chat_tokenizer), hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=1024, tie_word_embeddings=True))
    encoder = BertModel(BertConfig(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48))
    model = CepeForCausalLM(decoder, encoder, init_mode="copy",
                            encoder_tokenizer=AutoTokenizer.from_pretrained(embedder_path()))
    model.save_pretrained(tmp_path / "ckpt", tokenizer=chat_tokenizer)
    result = run_cli("ask", "Who directed 2001?", "--index", kubrick_index, "--cepe-model", tmp_path / "ckpt",
                     "--json", "--max-new-tokens", "4", "--no-cutoff")  # a configured checkpoint: cepe by default
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["reader"] == "cepe" and answer["usage"]["passages_read"] == 2
    assert_one_line_error(run_cli("ask", "q?", "--index", kubrick_index, "--reader", "cepe", "--decoder", "my/llm"),
                          "none ships for my/llm")
    assert_one_line_error(run_cli("ask", "q?", "--index", kubrick_index, "--read-margin=-0.5"), "must be 0 or more")


def test_stored_context_states_answer_as_encoding_on_the_fly(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "film.txt").write_text("2001: A Space Odyssey is a 1968 film directed by Stanley Kubrick.")
    (docs / "tower.txt").write_text("The Eiffel Tower in Paris was completed in 1889.")
    plain = run_cli("index", docs, "--index", tmp_path / "plain")
    stored = run_cli("index", docs, "--index", tmp_path / "stored", "--context-states")
    assert plain.returncode == 0 and stored.returncode == 0, stored.stderr
    assert "context states: 2 passages encoded" in stored.stderr
    answers = {}
    for name in ("plain", "stored"):  # float32, as the index encoded them: bfloat16 states are not those states
        result = run_cli("ask", "Who directed 2001: A Space Odyssey?", "--index", tmp_path / name, "--reader", "cepe",
                         "--k", "2", "--json", "--max-new-tokens", "12", "--dtype", "float32")
        assert result.returncode == 0, result.stderr
        answers[name] = json.loads(result.stdout)["text"]
        assert ("stores no context states" in result.stderr) == (name == "plain")  # said once, when encoding
    assert answers["stored"] == answers["plain"]
    assert_one_line_error(run_cli("index", docs, "--index", tmp_path / "x", "--cepe-model", "/tmp/nope-not-here"),
                          "--cepe-model is for --context-states")
    assert_one_line_error(run_cli("index", docs, "--index", tmp_path / "x", "--states-format", "int8"),
                          "--states-format is for --context-states")
    assert_one_line_error(run_cli("index", docs, "--index", tmp_path / "x", "--context-states", "--states-format",
                                  "int4"), "--states-format")


def test_eval_command_writes_a_summary(kubrick_index, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Who directed 2001?", "answer": ["Stanley Kubrick"]}) + "\n"
                         + json.dumps({"question": "Where is the Eiffel Tower?", "answer": ["Paris"]}) + "\n")
    result = run_cli("eval", "--questions", questions, "--index", kubrick_index, "--readers", "parallel,closed-book",
                     "--k", "1,2", "--out", tmp_path / "run", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [(row["reader"], row["k"], row["n"]) for row in summary] == [
        ("parallel", 1, 2), ("parallel", 2, 2), ("closed-book", 0, 2)]
    assert summary[0]["recall_at_k"] == 100.0
    assert "| parallel | 1 | 2 |" in result.stdout
    (tmp_path / "run" / "summary.json").unlink()
    again = run_cli("eval", "--questions", questions, "--index", kubrick_index, "--out", tmp_path / "run",
                    "--summary-only")
    assert again.returncode == 0 and json.loads((tmp_path / "run" / "summary.json").read_text()) == sorted(
        summary, key=lambda row: (row["reader"], row["k"]))
    assert_one_line_error(run_cli("eval", "--questions", tmp_path / "missing.jsonl", "--index", kubrick_index),
                          "cannot load questions")
    # Resuming with other reader settings would mix two configurations in one row: refused.
    assert_one_line_error(run_cli("eval", "--questions", questions, "--index", kubrick_index, "--readers", "parallel",
                                  "--k", "1", "--out", tmp_path / "run", "--max-new-tokens", "8", "--ape-scale", "0.8"),
                          "other settings (ape_scale 0.6 -> 0.8)")
    # A prompt/encoder split of the cepe reader is a row of its own.
    split = run_cli("eval", "--questions", questions, "--index", kubrick_index, "--readers", "cepe", "--k", "2",
                    "--n-prompt-passages", "1", "--out", tmp_path / "run", "--max-new-tokens", "8")
    assert split.returncode == 0, split.stderr
    rows = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [(row["reader"], row["k"], row["n"]) for row in rows] == [
        ("cepe-prompt1", 2, 2), ("closed-book", 0, 2), ("parallel", 1, 2), ("parallel", 2, 2)]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["readers"]["cepe-prompt1"]["n_prompt_passages"] == 1


def test_train_then_answer_with_the_trained_adapter(kubrick_index, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    facts = [("Stanley Kubrick", "Stanley Kubrick was an American film director. He directed 2001 in 1968."),
             ("Eiffel Tower", "The Eiffel Tower is a lattice tower in Paris. It was completed in 1889."),
             ("Nile", "The Nile is a major river in Africa. It flows into the Mediterranean Sea."),
             ("Mount Everest", "Mount Everest is the highest mountain. It lies on the border of Nepal and China.")]
    corpus.write_text("\n".join(json.dumps({"title": t, "text": x}) for t, x in facts * 10))
    out = tmp_path / "run"
    args = ["train", "--stage", "read", "--corpus", corpus, "--out", out, "--steps", "3", "--batch-size", "2",
            "--max-passages", "3", "--validation", "2", "--eval-every", "3", "--cross-attn-layers", "2"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert "validation ce" in result.stderr and "trained adapter in" in result.stderr
    adapter = json.loads((out / "model" / "cepe_adapter.json").read_text())
    assert adapter["decoder"] == "smollm2-135m-instruct" and adapter["num_cross_attn_layers"] == 2
    assert adapter["training_history"][-1]["stage"] == "read"
    assert adapter["training_history"][-1]["data"]["corpus"] == str(corpus)  # what the examples came from
    assert (out / "model" / "cross_attention.safetensors").stat().st_size < 10 * 2**20  # not the whole decoder
    from safetensors.torch import load_file

    from cepe_rag.cepe import load_cepe

    trained = load_file(str(out / "checkpoint" / "trainable.safetensors"))  # fp32 master weights
    loaded = dict(load_cepe(out / "model").named_parameters())
    assert len(trained) == 2 * 5 and all(  # q, k, v, o and the norm in each of the 2 layers
        (loaded[name].float() - tensor).abs().max() <= 1e-3 * tensor.abs().max() for name, tensor in trained.items())
    answer = run_cli("ask", "Who directed 2001?", "--index", kubrick_index, "--cepe-model", out / "model", "--json",
                     "--max-new-tokens", "4")
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["reader"] == "cepe"
    rerun = run_cli(*args)  # finished: resumes at the last step and trains nothing more
    assert rerun.returncode == 0 and "step 3:" not in rerun.stderr
    assert len((out / "log.jsonl").read_text().splitlines()) == 3
    assert_one_line_error(run_cli(*args[:-2], "--cross-attn-layers", "3", "--lr", "1"), "other settings")
    prepared = tmp_path / "prepared"  # examples built here, to train on another machine
    result = run_cli(*[prepared if arg == out else arg for arg in args], "--prepare-only")
    assert result.returncode == 0 and not (prepared / "model").exists(), result.stderr
    assert json.loads((prepared / "data_read.json").read_text())["examples"] > 0
    assert (prepared / "examples_read.jsonl").read_text() == (out / "examples_read.jsonl").read_text()
    assert_one_line_error(run_cli("train", "--stage", "nope", "--out", out), "unknown stage")
    assert_one_line_error(run_cli("train", "--corpus", tmp_path / "none.jsonl", "--out", tmp_path / "r2"),
                          "cannot load training corpus")
