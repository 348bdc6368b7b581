"""A new user's small folder (three files: a viaduct and its engineer, a town and its mayor, a company with its
founder and founding year), asked with the default settings: each answer reads the one relevant file, and no other,
led by the sentence the question asks about (sentence focus), and states the fact.

Without sentence focus the 135M decoder answered the mayor and the year, but asked who designed the viaduct or
founded the company it copied the passage's first sentence (docs/retrieval.md, "Sentence focus")."""

import json

import pytest

from tests.cli.test_cli import run_cli

pytestmark = pytest.mark.real_models

FILES = {
    "tresk-viaduct.md": "# Tresk Viaduct\n\nThe Tresk Viaduct is a railway viaduct of eleven arches near the town of "
                        "Brannholm. It was designed by the engineer Ottilie Varga and carried its first train in "
                        "1911.\n",
    "brannholm.md": "# Brannholm\n\nBrannholm is a small lake town in the hills east of Tresk. Its mayor is Ruben "
                    "Kessel, and its weekly cheese market is the oldest in the district.\n",
    "lindqvar-optics.md": "# Lindqvar Optics\n\nLindqvar Optics is a maker of telescope mirrors based in Brannholm. "
                          "The company was founded in 1936 by Agnes Morrow and now has about eighty employees.\n",
}
# (question, the fact, its file)
QUESTIONS = [("Who designed the Tresk Viaduct?", "Ottilie Varga", "tresk-viaduct.md"),
             ("Who is the mayor of Brannholm?", "Ruben Kessel", "brannholm.md"),
             ("Who founded Lindqvar Optics?", "Agnes Morrow", "lindqvar-optics.md"),
             ("In what year was Lindqvar Optics founded?", "1936", "lindqvar-optics.md")]


@pytest.fixture(scope="module")
def folder_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_folder")
    (root / "docs").mkdir()
    for name, text in FILES.items():
        (root / "docs" / name).write_text(text)
    assert run_cli("index", root / "docs", "--index", root / "idx").returncode == 0
    return root / "idx"


@pytest.mark.parametrize("question,fact,source", QUESTIONS)
def test_default_ask_reads_only_the_relevant_file_and_answers(folder_index, question, fact, source):
    # float32: the answer is asserted, so it must not rest on one CPU's bfloat16 rounding.
    result = run_cli("ask", question, "--index", folder_index, "--json", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert fact in answer["text"]
    assert [p["source"].rsplit("/", 1)[-1] for p in answer["passages"]] == [source]  # the cutoff read one file
    assert answer["usage"]["passages_retrieved"] == 3 and answer["usage"]["passages_read"] == 1
    assert answer["read_rule"].startswith("read 1 of 3 passages") and answer["read_rule"].endswith("(sentence focus)")


@pytest.mark.parametrize("question,fact,source", QUESTIONS)
def test_cepe_answers_with_the_fact_and_nothing_more(folder_index, question, fact, source):
    """The packaged CEPE adapter with the default settings answers in the passage's own words, and only the fact:
    a name ends where the passage stops naming ("Ottilie Varga", not "… and carried its first train in 1911") and
    a year is the only number the passage holds (docs/cli.md, "Extractive decoding"). Measured, float32: the first
    token's log-probability margin over the next allowed one is 1.4 nats for each name, every later step's at
    least 0.6."""
    result = run_cli("ask", question, "--index", folder_index, "--json", "--dtype", "float32", "--reader", "cepe")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["text"] == fact
    assert [p["source"].rsplit("/", 1)[-1] for p in answer["passages"]] == [source]


def test_no_cutoff_reads_every_passage_and_says_so(folder_index):
    result = run_cli("ask", QUESTIONS[0][0], "--index", folder_index, "--json", "--no-cutoff", "--max-new-tokens", "4")
    answer = json.loads(result.stdout)
    assert answer["usage"]["passages_read"] == 3
    assert answer["read_rule"].startswith("read 3 of 3 passages (no relevance cutoff)")
