"""`cepe-rag serve` end to end: the real server on a free loopback port, tiny random decoders, real clients.

The decoders are 2-layer random Llamas over the default decoder's tokenizer, with a wide initialisation so that
different prompts give different answers (a mix-up between requests would show).
"""

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

from cepe_rag.pipelines.indexing import build_index
from cepe_rag.pipelines.session import RagSession
from cepe_rag.readers import ClosedBookReader, ConcatReader, GenerationConfig, ParallelReader
from cepe_rag.retrieval import Abstention, Retriever
from cepe_rag.serving import Limits, RagService, create_app
from cepe_rag.settings import NOT_IN_DOCUMENTS
from cepe_rag.types import Conversation, Passage
from tests.readers.conftest import tiny_chat_llama

KEY = "test-key-123"
LIMITS = Limits(max_body_bytes=64 * 1024, max_messages=8, max_message_chars=2000, max_passages=8,
                max_passage_chars=2000, max_tokens=64, default_max_tokens=8, max_k=10, default_k=2)
FACTS = {
    "kubrick.txt": "2001: A Space Odyssey is a 1968 film directed by Stanley Kubrick.",
    "eiffel.txt": "The Eiffel Tower in Paris was completed in 1889 for the World's Fair.",
    "otters.md": "Sea otters use rocks as tools to crack open shellfish.",
    "everest.txt": "Mount Everest is the highest mountain above sea level, in the Himalayas.",
}
OWN = [{"text": "The Quorvath Bridge was designed by Maria Tollund.", "title": "Quorvath Bridge"},
       {"text": "The Velmarra museum holds ship models.", "title": "Velmarra"}]


@contextmanager
def serving(service, api_key=None):
    """The app under uvicorn in a thread, on a loopback port the OS picks."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(service, api_key=api_key), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def tiny_model(chat_tokenizer):
    return tiny_chat_llama(chat_tokenizer, initializer_range=0.2)


@pytest.fixture(scope="module")
def retriever(embedder, tmp_path_factory):
    corpus = tmp_path_factory.mktemp("serving") / "corpus"
    corpus.mkdir()
    for name, text in FACTS.items():
        (corpus / name).write_text(text)
    build_index([corpus], corpus.parent / "idx", embedder=embedder)
    return Retriever(corpus.parent / "idx", embedder=embedder)


def readers_for(model, tokenizer, max_tokens):
    generation = GenerationConfig(max_new_tokens=max_tokens)
    return {"concat": ConcatReader(model, tokenizer, generation=generation),
            "parallel": ParallelReader(model, tokenizer, generation=generation),
            "closed-book": ClosedBookReader(model, tokenizer, generation=generation)}


@pytest.fixture(scope="module")
def server(tiny_model, chat_tokenizer, retriever):
    # A wide batching window: requests from test threads arrive tens of milliseconds apart. No abstention: these
    # tests are about the random model's answers (test_abstains_... turns it on).
    session = RagSession(readers_for(tiny_model, chat_tokenizer, LIMITS.max_tokens), retriever, abstention=None)
    service = RagService(session, limits=LIMITS, max_batch=8, max_waiting=32, batch_window_ms=50)
    with serving(service, api_key=KEY) as url:
        yield url, service


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_openai_client_streaming_and_not(client, server):
    assert {m.id for m in client.models.list()} == {"concat", "parallel", "closed-book"}
    messages = [{"role": "user", "content": "Who designed the Quorvath Bridge?"}]
    whole = client.chat.completions.create(model="concat", messages=messages, max_tokens=10,
                                           extra_body={"passages": OWN})
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    assert [s["title"] for s in whole.model_extra["sources"]] == ["Quorvath Bridge", "Velmarra"]
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0

    chunks = list(client.chat.completions.create(model="concat", messages=messages, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"passages": OWN}))
    assert chunks[0].model_extra["sources"] == whole.model_extra["sources"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_answers_equal_the_reader_called_directly_with_the_chat_history(client, tiny_model, chat_tokenizer):
    """Multi-turn: earlier turns and the system prompt go through the decoder's chat template, as in ChatCepe."""
    history = [{"role": "user", "content": "Who built the bridge?"}, {"role": "assistant", "content": "Tollund."}]
    system = "Answer in one word."
    reply = client.chat.completions.create(
        model="concat", max_tokens=12, extra_body={"passages": OWN},
        messages=[{"role": "system", "content": system}, *history,
                  {"role": "user", "content": "And the museum?"}]).choices[0].message.content
    reader = ConcatReader(tiny_model, chat_tokenizer, generation=GenerationConfig(max_new_tokens=LIMITS.max_tokens))
    passages = [Passage(i, p["text"], p["title"]) for i, p in enumerate(OWN)]
    conversation = Conversation(system, tuple(history))
    assert reply == "".join(reader.stream("And the museum?", passages, conversation=conversation, max_new_tokens=12))
    # without the earlier turns the prompt, and here the answer, differ
    alone = Conversation(system)
    assert reply != "".join(reader.stream("And the museum?", passages, conversation=alone, max_new_tokens=12))


def test_chatopenai_works_unchanged(server):
    chat = ChatOpenAI(model="concat", base_url=server[0] + "/v1", api_key=KEY, max_tokens=10, temperature=0,
                      max_retries=0, extra_body={"passages": OWN})
    messages = [SystemMessage("Answer briefly."), HumanMessage("Who designed it?"), AIMessage("Maria."),
                HumanMessage("Where is it?")]
    answer = chat.invoke(messages)
    assert isinstance(answer.content, str) and answer.content
    assert "".join(chunk.content for chunk in chat.stream(messages)) == answer.content
    assert len(chat.batch(["first?", "second?"])) == 2


def test_retrieval_k_sources_and_closed_book(client, server):
    found = httpx.post(server[0] + "/v1/retrieve", json={"query": "Who directed 2001: A Space Odyssey?", "k": 3},
                       headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert len(found) == 3 and found[0]["title"] == "kubrick"
    assert [p["score"] for p in found] == sorted((p["score"] for p in found), reverse=True)
    messages = [{"role": "user", "content": "Who directed 2001: A Space Odyssey?"}]
    for model in ("concat", "parallel"):
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=4, extra_body={"k": 1})
        assert reply.model_extra["sources"] == found[:1]  # retrieved from the last user message
    default_k = client.chat.completions.create(model="concat", messages=messages, max_tokens=4)
    assert len(default_k.model_extra["sources"]) == LIMITS.default_k
    closed = client.chat.completions.create(model="closed-book", messages=messages, max_tokens=4)
    assert closed.model_extra["sources"] == []


def ask(client, question, passages, max_tokens, stream, system=None):
    messages = [{"role": "system", "content": system}] * (system is not None) + [{"role": "user", "content": question}]
    kwargs = dict(model="concat", messages=messages, max_tokens=max_tokens,
                  extra_body={"passages": passages} if passages is not None else {"k": 2})
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stream=True, **kwargs) if c.choices)
    return client.chat.completions.create(**kwargs).choices[0].message.content


def test_abstains_without_the_model_when_no_retrieved_passage_is_relevant(client, server):
    service = server[1]
    service.session.abstention = Abstention(floor=0.999)  # no passage of the test corpus is that close to any question
    try:
        messages = [{"role": "user", "content": "Who designed the Quorvath Bridge?"}]
        whole = client.chat.completions.create(model="concat", messages=messages, max_tokens=10, extra_body={"k": 2})
        assert whole.choices[0].message.content == NOT_IN_DOCUMENTS
        sources = whole.model_extra["sources"]
        assert len(sources) == 2 and all(s["dense_score"] < 0.999 for s in sources)  # the scores behind it
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="concat", messages=messages, max_tokens=10, stream=True, extra_body={"k": 2}) if c.choices)
        assert streamed == NOT_IN_DOCUMENTS
        own = client.chat.completions.create(model="concat", messages=messages, max_tokens=4,
                                             extra_body={"passages": OWN})  # the client's passages: always read
        assert own.choices[0].message.content != NOT_IN_DOCUMENTS
    finally:
        service.session.abstention = None


def test_concurrent_requests_are_batched_and_answer_as_alone(client, server):
    """Requests with their own passages or retrieval, lengths, streaming and system prompts (none, or one of two),
    batched together, answer exactly as each asked alone (float32): no request's settings reach another's."""
    systems = [None, "You are a terse librarian.", "Answer like a ship's captain, in one sentence."]
    cases = [(f"Question number {i} about {topic}?", OWN[i % 2:] if i % 3 else None, 4 + 3 * i, i % 2 == 0,
              systems[i % 3]) for i, topic in enumerate(["bridges", "museums", "otters", "towers", "films",
                                                          "mountains", "ships"])]
    alone = [ask(client, *case) for case in cases]
    assert len(set(alone)) == len(alone)  # different questions, different answers: a mix-up would show
    assert any(ask(client, *case[:4]) != answer for case, answer in zip(cases, alone) if case[4])  # prompts matter
    service = server[1]
    service.batcher.largest_batch = 0
    start = threading.Barrier(len(cases))

    def together(case):
        start.wait()
        return ask(client, *case)

    with ThreadPoolExecutor(len(cases)) as pool:
        assert list(pool.map(together, cases)) == alone
    assert service.batcher.largest_batch >= 2


def test_a_request_arriving_mid_batch_joins_it_and_does_not_wait_for_its_end(client, server, tiny_model):
    long_case, short_case = ("Tell me a long story about bridges.", OWN, 60, True), ("Otters?", OWN[1:], 5, True)
    alone = [ask(client, *long_case), ask(client, *short_case)]
    service = server[1]
    service.batcher.largest_batch = 0
    ended = {}

    def timed(name, case):
        text = ask(client, *case)
        ended[name] = time.monotonic()
        return text

    slow = tiny_model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))  # ~60 steps: over a second
    try:
        with ThreadPoolExecutor(1) as pool:
            long_answer = pool.submit(timed, "long", long_case)
            deadline = time.monotonic() + 10
            while service.batcher.counts()["decoding"] == 0:  # the long request is decoding
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.1)
            short_answer = timed("short", short_case)
            assert [long_answer.result(), short_answer] == alone
    finally:
        slow.remove()
    assert ended["short"] < ended["long"]  # answered while the long one was still decoding
    assert service.batcher.largest_batch == 2  # by joining its batch, not by a batch of its own


def error_of(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and "code" in error
    return error


GOOD = {"model": "concat", "messages": [{"role": "user", "content": "q?"}], "max_tokens": 2}
BAD = [
    ("invalid json", b'{"model": "concat", "messages": [', 400),
    ("not an object", b"[1, 2]", 400),
    ("no messages", {"model": "concat"}, 400),
    ("empty messages", {**GOOD, "messages": []}, 400),
    ("unknown model", {**GOOD, "model": "gpt-4o"}, 404),
    ("unknown role", {**GOOD, "messages": [{"role": "tool", "content": "x"}]}, 400),
    ("no user question last", {**GOOD, "messages": [{"role": "user", "content": "q"},
                                                    {"role": "assistant", "content": "a"}]}, 400),
    ("empty question", {**GOOD, "messages": [{"role": "user", "content": "  "}]}, 400),
    ("oversize message", {**GOOD, "messages": [{"role": "user", "content": "x" * 2001}]}, 400),
    ("too many messages", {**GOOD, "messages": [{"role": "user", "content": "q"}] * 9}, 400),
    ("too many passages", {**GOOD, "passages": [{"text": "p"}] * 9}, 400),
    ("oversize passage", {**GOOD, "passages": [{"text": "p" * 2001}]}, 400),
    ("passage without text", {**GOOD, "passages": [{"title": "t"}]}, 400),
    ("max_tokens over the limit", {**GOOD, "max_tokens": 65}, 400),
    ("max_tokens zero", {**GOOD, "max_tokens": 0}, 400),
    ("k zero", {**GOOD, "k": 0}, 400),
    ("k over the limit", {**GOOD, "k": 11}, 400),
    ("k not a number", {**GOOD, "k": "many"}, 400),
    ("n above 1", {**GOOD, "n": 2}, 400),
    ("negative temperature", {**GOOD, "temperature": -1}, 400),
    ("too many stop strings", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("prompt longer than the window", {**GOOD, "messages": [{"role": "user", "content": "a " * 470}]}, 400),
    ("body over the size limit", {**GOOD, "padding": "x" * 70_000}, 413),
]


@pytest.mark.parametrize("body,status", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_requests_get_openai_errors_and_the_server_stays_healthy(server, body, status):
    url = server[0]
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    error_of(httpx.post(url + "/v1/chat/completions", content=content, headers=headers, timeout=30), status)
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert httpx.post(url + "/v1/chat/completions", json=GOOD, headers=headers, timeout=30).status_code == 200


def test_other_refusals(server):
    url, auth = server[0], {"Authorization": f"Bearer {KEY}"}
    assert error_of(httpx.post(url + "/v1/chat/completions", json=GOOD), 401)["code"] == "invalid_api_key"
    error_of(httpx.post(url + "/v1/chat/completions", json=GOOD, headers={"Authorization": "Bearer nope"}), 401)
    error_of(httpx.get(url + "/v1/models", headers={"Authorization": KEY}), 401)  # the scheme is required
    error_of(httpx.post(url + "/v1/chat/completions", content=b"{{"), 401)  # the key is checked before the body
    chunked = (part for part in [json.dumps(GOOD).encode()])  # no Content-Length
    error_of(httpx.post(url + "/v1/chat/completions", content=chunked, headers=auth), 411)
    error_of(httpx.get(url + "/v1/nothing", headers=auth), 404)
    error_of(httpx.get(url + "/v1/chat/completions", headers=auth), 405)
    error_of(httpx.post(url + "/v1/retrieve", json={"query": "q", "k": 0}, headers=auth), 400)
    error_of(httpx.post(url + "/v1/retrieve", json={"query": " "}, headers=auth), 400)
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "q"}])


# --- a slow server: one row per batch, one waiting place ------------------------------------------------

CLIENT = textwrap.dedent("""
    import json, socket, sys, time
    port, body = int(sys.argv[1]), sys.argv[2].encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: application/json\\r\\n"
              b"Content-Length: %d\\r\\n\\r\\n%s" % (len(body), body))
    received = b""
    while b"data:" not in received:
        received += s.recv(65536)
    print("streaming", flush=True)
    time.sleep(600)  # until killed
""")


def streaming_client(url, body):
    """A client in its own process, to be killed mid-stream; returns once the request is sent."""
    port = url.rsplit(":", 1)[1]
    return subprocess.Popen([sys.executable, "-c", CLIENT, port, json.dumps(body)], stdout=subprocess.PIPE,
                            text=True)


def wait_for(url, **counts):
    deadline = time.monotonic() + 3
    while (health := httpx.get(url + "/health").json()) | counts != health:
        assert time.monotonic() < deadline, health
        time.sleep(0.02)


LONG = {"model": "concat", "messages": [{"role": "user", "content": "Tell me everything."}], "stream": True,
        "max_tokens": 400, "passages": OWN}


@pytest.fixture(scope="module")
def slow_server(chat_tokenizer):
    model = tiny_chat_llama(chat_tokenizer, initializer_range=0.2, max_position_embeddings=1024)
    limits = Limits(max_tokens=400)
    readers = readers_for(model, chat_tokenizer, limits.max_tokens)
    passages = [Passage(i, p["text"], p["title"]) for i, p in enumerate(OWN)]
    # This model does not end its answer by itself: a request for 400 tokens takes 400 steps, at least 4 s below.
    assert readers["concat"].answer("Tell me everything.", passages, max_new_tokens=400).usage["decode_steps"] == 400
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.01))  # ~10 ms a decoding step
    service = RagService(RagSession(readers), limits=limits, max_batch=1, max_waiting=1, batch_window_ms=0)
    with serving(service) as url:
        yield url


def test_a_killed_client_frees_its_slot_at_once(slow_server):
    client = streaming_client(slow_server, LONG)
    assert client.stdout.readline() == "streaming\n"
    wait_for(slow_server, decoding=1)
    client.kill()
    client.wait()
    started = time.monotonic()
    wait_for(slow_server, decoding=0, waiting=0)
    assert time.monotonic() - started < 1.5  # not the seconds the rest of its answer would take
    assert httpx.post(slow_server + "/v1/chat/completions", json={**LONG, "stream": False, "max_tokens": 5},
                      timeout=10).status_code == 200


def test_a_full_queue_answers_429(slow_server):
    running = streaming_client(slow_server, LONG)
    assert running.stdout.readline() == "streaming\n"
    waiting = streaming_client(slow_server, LONG)
    wait_for(slow_server, decoding=1, waiting=1)
    refused = httpx.post(slow_server + "/v1/chat/completions", json=LONG)
    assert error_of(refused, 429)["type"] == "rate_limit_error" and refused.headers["Retry-After"] == "1"
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=slow_server + "/v1", api_key="unused", max_retries=0).chat.completions.create(
            model="concat", messages=LONG["messages"], extra_body={"passages": OWN})
    for client in (waiting, running):  # a client that leaves the queue frees its place too
        client.kill()
        client.wait()
    wait_for(slow_server, decoding=0, waiting=0)


def test_serve_command_checks_its_options_before_loading_models(tmp_path):
    from tests.cli.test_cli import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("serve", "--reader", "concat,poem"), "unknown reader 'poem'")
    assert_one_line_error(run_cli("serve", "--index", tmp_path / "none", "--port", "8123"), "no index at")
    assert_one_line_error(run_cli("serve", "--k", "20", "--max-k", "10"), "--max-k (at least --k)")
