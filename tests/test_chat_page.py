"""The chat page at GET /, driven in a real headless Chromium against the real server.

Uses the system's Chromium and chromedriver (Debian: ``apt-get install chromium
chromium-driver``; .ci/run installs them) through Selenium; nothing downloads a browser.
The model is a tiny oracle step35 whose MTP heads always agree with the trunk (every draft
accepted) and whose greedy reply starts with ``<script>``.

PMTP_SCREENSHOT_DIR=dir keeps the screenshots (the README's comes from here).
"""
from __future__ import annotations

import json
import os
import shutil
import time

import httpx
import pytest

from conftest import start_server
import factories as testing

webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install 'pyllama-mtp[test]')")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Chromium and chromedriver from the system's packages "
           "(Debian/Ubuntu: apt-get install chromium chromium-driver)")

API_KEY = "page-test-key"
REPLY_START = "<script>"


@pytest.fixture(scope="module")
def script_model(tmp_path_factory):
    # the chat template ends with "\n": its greedy continuation spells REPLY_START
    chain = testing.char_tokens("\n" + REPLY_START)
    path = tmp_path_factory.mktemp("page") / "script-oracle.gguf"
    return str(testing.write_step35(path, seed=5, oracle=True, acceptance=1.0, oracle_chain=chain))


def _serve(model, *extra):
    proc, base = start_server(model, "--mtp", "--draft", "3", "--n-ctx", "4096", *extra)
    return proc, base


@pytest.fixture(scope="module")
def server(script_model):
    proc, base = _serve(script_model)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def keyed_server(script_model):
    proc, base = _serve(script_model, "--api-key", API_KEY)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def driver():
    os.environ.setdefault("SE_OFFLINE", "true")     # never let Selenium fetch a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--disable-extensions"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield d
    d.quit()


@pytest.fixture
def page(driver, server):
    """The page, freshly loaded with empty storage, its model known."""
    return open_page(driver, server)


def open_page(driver, base, state="idle"):
    driver.get(base + "/")
    driver.execute_script("localStorage.clear(); sessionStorage.clear();")
    driver.get(base + "/")
    wait_state(driver, state)
    return driver


def wait_state(driver, state, timeout=30):
    WebDriverWait(driver, timeout).until(
        lambda d: d.execute_script("return document.body.dataset.state") == state,
        f"page never reached state {state!r}")


def send(driver, text):
    box = driver.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def stored_conversation(driver):
    return json.loads(driver.execute_script("return localStorage.getItem('pmtp.conversation')") or "[]")


def screenshot(driver, tmp_path, name):
    path = tmp_path / name
    driver.save_screenshot(str(path))
    keep = os.environ.get("PMTP_SCREENSHOT_DIR")
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(path, os.path.join(keep, name))
    return path


def last_assistant(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]


def test_page_is_served_with_a_strict_content_policy(server):
    r = httpx.get(server + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = r.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    for name in ("chat.js", "markdown.js", "chat.css"):
        assert httpx.get(f"{server}/static/{name}").status_code == 200
    bad = httpx.get(server + "/static/../app.py")
    assert bad.status_code == 404
    assert httpx.get(server + "/static/nothing.js").json()["error"]["code"] == "not_found"


def test_a_message_streams_with_draft_tokens_tinted_and_the_panel_filled(page, tmp_path):
    assert page.find_element(By.ID, "model").text == "tiny"
    draft_choices = [o.get_attribute("value") for o in page.find_elements(By.CSS_SELECTOR, "#draft option")]
    assert draft_choices == ["auto", "0", "1", "2", "3"]
    page.find_element(By.ID, "max-tokens").clear()
    page.find_element(By.ID, "max-tokens").send_keys("64")
    page.find_element(By.ID, "system").send_keys("You are terse.")
    send(page, "Tell me something.")
    wait_state(page, "idle")
    reply = last_assistant(page)
    content = reply.find_element(By.CSS_SELECTOR, ".content")
    # the model's "<script>" is text on the page, never an element
    assert content.text.startswith(REPLY_START)
    assert not page.find_elements(By.CSS_SELECTOR, "#messages script")
    # every draft is accepted: most of the text is tinted, the first token is not
    tinted = "".join(s.text for s in content.find_elements(By.CSS_SELECTOR, "span.d"))
    assert len(tinted) > len(content.text) / 2

    panel = reply.find_element(By.CSS_SELECTOR, ".panel")
    assert float(panel.find_element(By.CSS_SELECTOR, ".tps b").text) > 0
    assert panel.find_element(By.CSS_SELECTOR, ".tokens b").text == "64"
    assert panel.find_element(By.CSS_SELECTOR, ".acceptance b").text == "100%"
    assert float(panel.find_element(By.CSS_SELECTOR, ".mean-accepted b").text) == pytest.approx(3.0, abs=0.01)
    bars = panel.find_elements(By.CSS_SELECTOR, ".positions span")
    assert [b.get_attribute("data-pos") for b in bars] == ["1", "2", "3"]
    reused, prompt = panel.find_element(By.CSS_SELECTOR, ".reused b").text.split(" / ")
    assert int(prompt) > 0 and int(reused) == 0
    assert panel.find_element(By.CSS_SELECTOR, "canvas.plot")

    # it streamed: several chunks arrived, each adding tokens
    stored = stored_conversation(page)
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assistant = stored[1]
    assert len(assistant["samples"]) >= 5 and assistant["samples"][-1][1] == 64
    assert assistant["content"].startswith(REPLY_START)
    # the first token is the trunk's own (nothing drafted before it), "scr" came as 3 drafts
    assert assistant["runs"][:2] == [[1, False], [3, True]]
    assert assistant["stats"]["acceptance_per_position"] == [1.0, 1.0, 1.0]
    screenshot(page, tmp_path, "chat-page.png")

    # a second turn reuses the first turn's prompt from the KV cache
    send(page, "And another thing?")
    wait_state(page, "idle")
    reused, prompt = last_assistant(page).find_element(By.CSS_SELECTOR, ".reused b").text.split(" / ")
    assert int(reused) > 0 and int(prompt) > int(reused)
    # the conversation survives a reload
    page.refresh()
    wait_state(page, "idle")
    assert len(page.find_elements(By.CSS_SELECTOR, ".msg")) == 4


def test_mtp_off_and_draft_zero_give_the_same_text_untinted(page):
    send(page, "Same prompt.")
    wait_state(page, "idle")
    with_mtp = last_assistant(page).find_element(By.CSS_SELECTOR, ".content").text
    page.find_element(By.ID, "mtp").click()        # MTP off for the next message
    page.find_element(By.ID, "regenerate").click()   # runs synchronously up to the request
    wait_state(page, "idle")
    assert stored_conversation(page)[-1]["settings"] == {"mtp": False, "draft": 0}
    reply = last_assistant(page)
    assert reply.find_element(By.CSS_SELECTOR, ".content").text == with_mtp   # exact: greedy output unchanged
    assert not reply.find_elements(By.CSS_SELECTOR, ".content span.d")
    assert reply.find_element(By.CSS_SELECTOR, ".acceptance b").text == "–"
    assert len(page.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1    # regenerate replaced it


def test_stop_ends_a_long_generation_and_the_server_goes_on(page):
    page.find_element(By.ID, "max-tokens").clear()
    page.find_element(By.ID, "max-tokens").send_keys("4000")
    send(page, "Write a lot.")
    WebDriverWait(page, 30, poll_frequency=0.02).until(
        lambda d: len(d.execute_script("return document.querySelector('.msg.assistant .content').textContent")) > 20)
    page.find_element(By.ID, "stop").click()
    t0 = time.monotonic()
    wait_state(page, "idle", timeout=10)
    assert time.monotonic() - t0 < 5
    reply = last_assistant(page)
    assert reply.find_element(By.CSS_SELECTOR, ".note").text == "stopped"
    tokens = stored_conversation(page)[-1]["tokens"]
    assert 0 < tokens < 4000
    time.sleep(0.5)
    assert stored_conversation(page)[-1]["tokens"] == tokens       # nothing more arrives
    # the server dropped the abandoned request and serves the next one at once
    page.find_element(By.ID, "max-tokens").clear()
    page.find_element(By.ID, "max-tokens").send_keys("8")
    send(page, "Short one.")
    wait_state(page, "idle", timeout=30)
    assert last_assistant(page).find_element(By.CSS_SELECTOR, ".tokens b").text == "8"


def test_markdown_renders_and_no_markup_gets_through(driver, server):
    stored = [
        {"role": "user", "content": "<img src=x onerror=\"window.__pwned=1\"> **not bold**"},
        {"role": "assistant", "runs": [[0, False]], "samples": [], "tokens": 0, "fromDraft": 0,
         "content": "# Title\n\nSome **bold**, *it*, `code <b>x</b>` and [a link](https://example.org) "
                    "and [bad](javascript:window.__pwned=2).\n\n```python\nprint('<script>')\n```\n\n"
                    "- one <iframe src=\"javascript:window.__pwned=3\"></iframe>\n- two\n\n"
                    "<script>window.__pwned=4</script><img src=x onerror=\"window.__pwned=5\">"},
    ]
    driver.get(server + "/")
    driver.execute_script("localStorage.clear(); localStorage.setItem('pmtp.conversation', arguments[0]);",
                          json.dumps(stored))
    driver.get(server + "/")
    wait_state(driver, "idle")
    msgs = driver.find_element(By.ID, "messages")
    assert not msgs.find_elements(By.CSS_SELECTOR, "script, img, iframe")
    assert driver.execute_script("return window.__pwned === undefined")
    user = msgs.find_element(By.CSS_SELECTOR, ".msg.user .content")
    assert user.text.startswith("<img src=x onerror=")
    content = msgs.find_element(By.CSS_SELECTOR, ".msg.assistant .content")
    assert content.find_element(By.CSS_SELECTOR, "h3").text == "Title"
    assert content.find_element(By.CSS_SELECTOR, "strong").text == "bold"
    assert content.find_element(By.CSS_SELECTOR, "em").text == "it"
    assert content.find_element(By.CSS_SELECTOR, "p code").text == "code <b>x</b>"
    links = content.find_elements(By.CSS_SELECTOR, "a")
    assert [a.get_attribute("href") for a in links] == ["https://example.org/"]
    assert "[bad](javascript:window.__pwned=2)" in content.text
    assert content.find_element(By.CSS_SELECTOR, "pre code").text == "print('<script>')"
    assert content.find_element(By.CSS_SELECTOR, "pre").get_attribute("data-lang") == "python"
    assert [li.text for li in content.find_elements(By.CSS_SELECTOR, "li")][1] == "two"
    assert "<script>window.__pwned=4</script>" in content.text


def test_with_an_api_key_the_page_asks_for_it_and_the_api_stays_closed(driver, keyed_server):
    open_page(driver, keyed_server, state="locked")
    assert driver.find_element(By.ID, "key-dialog").is_displayed()
    assert httpx.post(keyed_server + "/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 401
    assert httpx.get(keyed_server + "/v1/models").status_code == 401
    driver.find_element(By.ID, "key-input").send_keys("wrong")
    driver.find_element(By.ID, "key-save").click()
    wait_state(driver, "locked")
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "key-dialog").is_displayed())
    driver.find_element(By.ID, "key-input").send_keys(API_KEY)
    driver.find_element(By.ID, "key-save").click()
    wait_state(driver, "idle")
    assert driver.execute_script("return sessionStorage.getItem('pmtp.apiKey')") == API_KEY
    assert driver.execute_script("return localStorage.getItem('pmtp.apiKey')") is None
    send(driver, "hello")
    wait_state(driver, "idle")
    assert last_assistant(driver).find_element(By.CSS_SELECTOR, ".content").text.startswith(REPLY_START)
