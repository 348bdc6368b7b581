"""The chat page at `serve`'s `/`, in a real headless Chromium (Debian's chromium and chromedriver, driven by
selenium) against the real server on a loopback port, over the serving tests' small index and tiny random decoders.

Without chromium these tests are skipped, unless CEPE_RAG_REQUIRE_BROWSER is set (CI sets it): then they fail.
"""

import os
import shutil
import time

import httpx
import pytest

from cepe_rag.serving import Limits, RagService
from cepe_rag.settings import NOT_IN_DOCUMENTS
from tests.serving import test_server
from tests.serving.test_server import FACTS, readers_for, serving

KEY = "page-key-456"
LIMITS = Limits(max_tokens=64, default_max_tokens=12, max_k=10, default_k=2)
QUESTION = "Who directed 2001: A Space Odyssey?"
NONSENSE = "What does a zorblaxian quuxifier eat?"  # words no document contains
# The serving tests' module fixtures: their tiny random decoder and their small index (FACTS).
tiny_model, retriever = test_server.tiny_model, test_server.retriever
# Without the background-networking flags, Chromium's own connections are refused here and it hangs.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1100,900"]


def chromium_or_skip() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if chromium and chromedriver:
        return chromium, chromedriver
    why = "chromium and chromedriver are not installed (apt-get install chromium chromium-driver; `make test` does)"
    if os.environ.get("CEPE_RAG_REQUIRE_BROWSER"):
        pytest.fail(f"{why}, and CEPE_RAG_REQUIRE_BROWSER is set")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, chromedriver = chromium_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))  # both paths given: no download
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def rag_service(readers, retriever_) -> RagService:
    """With the default abstention. (The session refactor moves the readers and retriever into a RagSession.)"""
    try:
        from cepe_rag.pipelines.session import RagSession
    except ImportError:
        return RagService(readers, retriever_, limits=LIMITS)
    return RagService(RagSession(readers, retriever_), limits=LIMITS)


@pytest.fixture(scope="module")
def server(tiny_model, chat_tokenizer, retriever):
    with serving(rag_service(readers_for(tiny_model, chat_tokenizer, LIMITS.max_tokens), retriever),
                 api_key=KEY) as url:
        yield url


def api(url, **body):
    """The same request the page sends, unstreamed, from Python."""
    response = httpx.post(url + "/v1/chat/completions", json={"model": "concat", **body},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def wait(driver, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def page_state(driver) -> dict:
    return driver.execute_script("""
        const text = (node) => node ? node.textContent : null;
        const turns = [...document.querySelectorAll('.turn')].map((turn) => {
            const reply = turn.querySelector('.assistant'), note = reply.querySelector('.abstention');
            return {question: text(turn.querySelector('.user .text')), state: reply.dataset.state,
                    answer: text(reply.querySelector('.answer')), note: note.hidden ? null : note.textContent,
                    status: reply.querySelector('.status').hidden ? null : text(reply.querySelector('.status')),
                    rule: text(reply.querySelector('.read-rule')),
                    sources: [...reply.querySelectorAll('.sources li')].map((item) => ({
                        title: text(item.querySelector('.title')), source: text(item.querySelector('.source')),
                        scores: text(item.querySelector('.scores'))}))};
        });
        const notice = document.getElementById('notice');
        return {turns, notice: notice.hidden ? null : notice.textContent,
                models: [...document.querySelectorAll('#model option')].map((option) => option.value),
                question: document.getElementById('question').value,
                stored_key: sessionStorage.getItem('cepe-rag-api-key'), url: location.href,
                requests: performance.getEntriesByType('resource').map((entry) => entry.name)};
    """)


def ask(driver, question, k=None) -> dict:
    """Type the question and press Enter; the finished turn, once its stream has ended."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    before = len(page_state(driver)["turns"])
    k_field = driver.find_element(By.ID, "k")
    k_field.clear()
    if k is not None:
        k_field.send_keys(str(k))
    driver.find_element(By.ID, "question").send_keys(question, Keys.ENTER)
    wait(driver, lambda d: len(turns := page_state(d)["turns"]) > before and turns[-1]["state"] != "streaming")
    return page_state(driver)["turns"][-1]


def type_key(driver, key):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element(By.ID, "key")
    field.clear()
    field.send_keys(key, Keys.ENTER)


@pytest.fixture
def page(browser, server):
    """The page loaded afresh (nothing in sessionStorage), with the API key typed in."""
    browser.get(server)
    browser.execute_script("sessionStorage.clear()")
    browser.get(server)
    type_key(browser, KEY)
    wait(browser, lambda d: page_state(d)["models"])
    return browser


def test_the_page_loads_without_the_key_asks_for_it_and_keeps_it_out_of_urls(browser, server):
    from selenium.webdriver.common.by import By

    response = httpx.get(server + "/")  # no key: the page itself is public, its /v1 requests are not
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in response.headers["content-security-policy"]
    assert "http://" not in response.text and "https://" not in response.text  # nothing from another host
    assert httpx.get(server + "/v1/models").status_code == 401

    browser.get(server)
    browser.execute_script("sessionStorage.clear()")
    browser.get(server)
    wait(browser, lambda d: page_state(d)["notice"])
    state = page_state(browser)
    assert "needs an API key" in state["notice"] and state["models"] == []
    assert browser.find_element(By.ID, "key").get_attribute("type") == "password"
    browser.find_element(By.ID, "question").send_keys(QUESTION)
    browser.find_element(By.ID, "send").click()  # no model list without the key: nothing is sent
    time.sleep(0.5)
    assert page_state(browser)["turns"] == [] and page_state(browser)["question"] == QUESTION

    type_key(browser, "wrong-key")
    wait(browser, lambda d: "refused this API key" in (page_state(d)["notice"] or ""))
    type_key(browser, KEY)
    wait(browser, lambda d: page_state(d)["models"])
    state = page_state(browser)
    assert state["models"] == ["concat", "parallel", "closed-book"] and state["notice"] is None
    assert state["stored_key"] == KEY  # this tab's sessionStorage, at most
    turn = ask(browser, "")  # the question typed earlier is still in the box
    assert turn["state"] == "done" and turn["question"] == QUESTION and turn["answer"]
    state = page_state(browser)
    assert state["url"] == server + "/"
    assert all(name.startswith(server + "/") and KEY not in name for name in state["requests"]), state["requests"]


def test_the_streamed_answer_and_its_sources_are_the_apis(page, server):
    turn = ask(page, QUESTION, k=3)
    whole = api(server, messages=[{"role": "user", "content": QUESTION}], k=3)
    assert turn["state"] == "done" and turn["note"] is None
    cut = whole["choices"][0]["finish_reason"] == "length"  # the random decoder runs to its token limit
    assert turn["status"] == ("The answer was cut at its token limit." if cut else None)
    assert turn["answer"] == whole["choices"][0]["message"]["content"] != ""  # greedy: the same text
    expected = whole["sources"]
    assert len(expected) == 3 and expected[0]["title"] == "kubrick"
    assert [(s["title"], s["source"]) for s in turn["sources"]] == [(s["title"], s["source"]) for s in expected]
    assert all(s["source"].endswith(tuple(FACTS)) for s in turn["sources"])
    for shown, source in zip(turn["sources"], expected):
        assert f"score {source['score']:.3f}" in shown["scores"]
        assert f"dense {source['dense_score']:.3f}" in shown["scores"]
    assert turn["rule"] == "Read rule: " + whole["read"]["rule"]

    # A follow-up sends the conversation so far: the page's second answer is the API's with the earlier turns,
    # which differs from the answer to the follow-up alone.
    follow_up = "Is 2001: A Space Odyssey a 1968 film by Stanley Kubrick?"  # read, not abstained, alone too
    second = ask(page, follow_up)
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": turn["answer"]},
               {"role": "user", "content": follow_up}]
    with_history, alone = (api(server, messages=messages)["choices"][0]["message"]["content"]
                           for messages in (history, history[-1:]))
    assert second["note"] is None and second["answer"] == with_history != alone


def test_a_question_no_document_answers_shows_the_abstention(page, server):
    from selenium.webdriver.common.by import By

    turn = ask(page, NONSENSE)
    whole = api(server, messages=[{"role": "user", "content": NONSENSE}])
    rule = whole["read"]["rule"]
    assert rule.startswith("no passage read:") and whole["choices"][0]["message"]["content"] == NOT_IN_DOCUMENTS
    assert turn["state"] == "done" and turn["answer"] == NOT_IN_DOCUMENTS
    assert turn["note"] == "Not in the documents: " + rule.removeprefix("no passage read:").strip()
    assert page.find_elements(By.CSS_SELECTOR, ".turn:last-child .abstention")[0].is_displayed()
    assert [s["title"] for s in turn["sources"]] == [s["title"] for s in whole["sources"]]  # the scores behind it


def test_errors_are_shown_in_the_page(page, server):
    turn = ask(page, QUESTION, k=LIMITS.max_k + 1)
    assert turn["state"] == "error" and turn["status"] == f"k must be between 1 and {LIMITS.max_k}, got 11"
    assert page_state(page)["question"] == QUESTION  # kept, to send again
    type_key(page, "wrong-key")
    turn = ask(page, "", k=1)
    assert turn["state"] == "error" and "API key" in turn["status"]
    assert "refused this API key" in page_state(page)["notice"]
