"""`cepe-rag chat` on the real packaged models: piped input (one question per line) and a pseudo-terminal (a
conversation: follow-ups, slash commands, Ctrl-C stopping an answer and not the chat)."""

import os
import signal
import subprocess
import sys

import pexpect
import pytest

from tests.cli.test_cli import kubrick_index, run_cli  # noqa: F401 -- a fixture, and the CLI runner

pytestmark = pytest.mark.real_models

QUESTION = "Who directed 2001: A Space Odyssey?"


def test_piped_lines_are_questions_and_commands(kubrick_index):  # noqa: F811
    lines = [QUESTION, "/k 1", "/bogus", "/reader closed-book", "What is the Zyxqor glimmerback?", "/quit",
             "never read"]
    result = subprocess.run([sys.executable, "-m", "cepe_rag", "chat", "--index", str(kubrick_index), "--dtype",
                             "float32"], input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    answers = [line for line in result.stdout.splitlines() if line.strip()]
    assert "Kubrick" in answers[0]
    assert "error: unknown command /bogus: /help lists them" in result.stderr
    assert "k=1" in result.stderr and "reader: closed-book" in result.stderr
    assert result.stderr.count("first token") == 2  # two questions answered; nothing after /quit
    assert result.stdout.count("Sources") == 1  # the first answer's table; closed-book reads none
    assert result.stderr.count("read 1 of 2 passages") == 1


def test_a_bad_option_stops_before_loading(kubrick_index):  # noqa: F811
    result = run_cli("chat", "--index", kubrick_index, "--k", "0")
    assert result.returncode != 0 and "--k must be at least 1" in result.stderr and "Traceback" not in result.stderr


def test_a_terminal_conversation_with_follow_ups_commands_and_ctrl_c(kubrick_index, tmp_path):  # noqa: F811
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TERM": "xterm", "XDG_STATE_HOME": str(tmp_path),
           "PROMPT_TOOLKIT_NO_CPR": "1"}  # pexpect answers no cursor-position request
    chat = pexpect.spawn(sys.executable, ["-m", "cepe_rag", "chat", "--index", str(kubrick_index), "--dtype",
                                          "float32", "--no-abstain", "--max-new-tokens", "400"],
                         env=env, encoding="utf-8", timeout=120, dimensions=(40, 200),
                         # started as a background job of a script is: with SIGINT ignored, which Ctrl-C must outdo
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        chat.expect("›")
        chat.sendline(QUESTION)
        chat.expect("Kubrick")
        chat.expect("first token")
        chat.expect("›")
        chat.sendline("When was it released?")  # names nothing: searched with the question before it
        chat.expect("first token")
        chat.expect("›")
        chat.sendline("/sources")
        chat.expect("Stanley Kubrick")  # the passage's text
        printed = chat.before
        chat.expect("›")
        printed += chat.before
        assert "film.txt" in printed and "tower.txt" not in printed
        chat.sendline("Write a long poem about the Eiffel Tower, with many verses.")
        chat.expect_exact("\x1b[?2004l")  # the prompt has let go of the terminal (bracketed paste off)
        chat.expect(r"[A-Za-z]{3}")  # the answer has started: Ctrl-C now is the terminal's SIGINT
        chat.sendintr()
        chat.expect("stopped")
        chat.expect("›")  # the chat goes on
        chat.sendline("/quit")
        chat.expect(pexpect.EOF)
    finally:
        chat.close()
    assert chat.exitstatus == 0
    assert QUESTION in (tmp_path / "cepe-rag" / "chat_history").read_text()  # prompt_toolkit kept the history
