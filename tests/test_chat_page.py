"""The chat page at GET /, in a real browser: Debian's headless Chromium, driven by Playwright."""

import json
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from playwright.sync_api import Browser, Page, expect, sync_playwright

from llama.tokenizer import Tokenizer
from tests.helpers import ROOT, Served, started, write_checkpoint

CHROMIUM = "/usr/bin/chromium"
# Headless, without the background traffic this machine's closed network would refuse.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip
ARTIFACTS = ROOT / "tests" / "artifacts"  # screenshots a test run leaves to look at
SUM = "What is 38 + 47?"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def demo() -> Iterator[Served]:
    with started("--max_seq_len", "512") as served:
        yield served


@pytest.fixture(scope="module")
def rambling(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer, tokenizer_path: str) -> Iterator[Served]:
    """A random model that never says EOS (its logit is 0, the others' are large), and large enough
    to take a while over each token: its answers run long enough to be stopped."""
    shape = {"dim": 768, "n_layers": 6, "n_heads": 12, "multiple_of": 32, "vocab_size": -1}
    folder = write_checkpoint(tmp_path_factory.mktemp("rambling") / "rambling", shape, tokenizer.n_words)
    shard = folder / "consolidated.00.pth"
    weights = torch.load(shard, weights_only=True)
    weights["output.weight"] *= 8
    weights["output.weight"][tokenizer.eos_id] = 0
    torch.save(weights, shard)
    with started("--ckpt_dir", str(folder), "--tokenizer_path", tokenizer_path, "--max_seq_len", "4096",
                 "--model_name", "rambling") as served:  # fmt: skip
        yield served


def open_page(browser: Browser, served: Served, **context) -> Page:
    page = browser.new_context(**context).new_page()
    page.goto(served.url)
    return page


def ready(page: Page, model: str = "llama-2-demo") -> None:
    expect(page.locator("#model")).to_have_text(model)


def setting(page: Page, field: str, value: str) -> None:
    """Open the settings (a closed <details> at first) and set one."""
    if not page.locator("#settings").evaluate("element => element.open"):
        page.click("#settings summary")
    page.fill(field, value)


def ask(page: Page, text: str) -> None:
    page.fill("#message", text)
    page.press("#message", "Enter")


def answers(page: Page):
    return page.locator(".message.assistant")


def finished_answer(page: Page, index: int = -1) -> str:
    """The text of an answer once its stats line shows that it is done, without the stats."""
    answer = answers(page).nth(index)
    expect(answer.locator(".stats")).to_be_visible(timeout=60_000)
    return answer.evaluate("element => element.firstChild ? element.firstChild.textContent : ''")


def api_answer(served: Served, messages: list[dict]) -> str:
    result = served.client.chat.completions.create(model="llama-2-demo", messages=messages, temperature=0)
    return result.choices[0].message.content


def test_a_sum_streams_in_and_matches_the_api(browser: Browser, demo: Served) -> None:
    page = open_page(browser, demo)
    ready(page)
    setting(page, "#temperature", "0")
    # Record every length the answer goes through, to see it arrive piece by piece.
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const answer = document.querySelector('.message.assistant');
            if (answer) window.lengths.push(answer.textContent.length);
        }).observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
    }""")
    ask(page, SUM)
    shown = finished_answer(page)
    assert (
        shown == api_answer(demo, [{"role": "user", "content": SUM}]) == "8 + 7 = 15, 3 + 4 + 1 = 8, so 38 + 47 = 85."
    )
    assert len(set(page.evaluate("window.lengths"))) > 5  # streamed, not all at once
    stats = answers(page).nth(0).locator(".stats").text_content()
    assert "tokens" in stats and "tokens/s" in stats


def test_a_second_turn_sends_the_conversation_and_new_chat_forgets_it(browser: Browser, demo: Served) -> None:
    page = open_page(browser, demo)
    ready(page)
    setting(page, "#temperature", "0")
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    ask(page, SUM)
    first = finished_answer(page)
    ask(page, "And 12 + 30?")
    second = finished_answer(page)
    dialog = [{"role": "user", "content": SUM}, {"role": "assistant", "content": first},
              {"role": "user", "content": "And 12 + 30?"}]  # fmt: skip
    assert sent[-1]["messages"] == dialog
    assert second == api_answer(demo, dialog)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "chat-page.png")  # a finished conversation (README shows one)
    page.click("#new-chat")
    expect(page.locator("#conversation .message")).to_have_count(0)
    ask(page, "And 12 + 30?")
    assert finished_answer(page) == api_answer(demo, dialog[2:])
    assert sent[-1]["messages"] == dialog[2:]


def test_stop_keeps_the_partial_answer_and_frees_the_slot(browser: Browser, rambling: Served) -> None:
    page = open_page(browser, rambling)
    ready(page, "rambling")
    ask(page, "The cat")
    expect(page.locator("#stop")).to_be_visible()
    page.wait_for_function("() => document.querySelector('.message.assistant').textContent.length > 20")
    assert rambling.metric("llama_busy_slots") == 1
    page.click("#stop")
    stats = answers(page).nth(0).locator(".stats")
    expect(stats).to_contain_text("stopped")
    partial = finished_answer(page)
    assert len(partial) > 20
    deadline = time.monotonic() + 10
    while rambling.metric("llama_busy_slots") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rambling.metric("llama_busy_slots") == 0
    expect(page.locator("#send")).to_be_visible()  # and the page is ready for the next message


def test_errors_are_shown_with_the_servers_words_and_the_message_is_kept(browser: Browser, demo: Served) -> None:
    page = open_page(browser, demo)
    ready(page)
    setting(page, "#max-tokens", "100000")
    ask(page, SUM)
    error = page.locator(".message.error")
    expect(error).to_contain_text("together exceed the context window of 512 tokens")
    expect(page.locator("#message")).to_have_value(SUM)  # what the user wrote is not lost
    expect(answers(page)).to_have_count(0)


def test_a_server_that_is_gone_is_said_not_waited_for(browser: Browser) -> None:
    with started() as served:
        page = open_page(browser, served)
        ready(page)
        served.job.terminate()
        served.job.wait(timeout=30)
        ask(page, SUM)
        expect(page.locator(".message.error")).to_contain_text("the server is gone", timeout=15_000)


def test_with_an_api_key_the_page_asks_for_it_and_keeps_it_for_the_tab(browser: Browser) -> None:
    with started("--api_key", "sekrit", key="sekrit") as served:
        context = browser.new_context()
        page = context.new_page()
        page.goto(served.url)
        expect(page.locator("#key-form")).to_be_visible()
        page.fill("#api-key", "wrong")
        page.press("#api-key", "Enter")
        expect(page.locator("#key-form")).to_be_visible()  # still asked
        page.fill("#api-key", "sekrit")
        page.press("#api-key", "Enter")
        ready(page)
        expect(page.locator("#key-form")).to_be_hidden()
        setting(page, "#temperature", "0")
        ask(page, SUM)
        assert finished_answer(page) == "8 + 7 = 15, 3 + 4 + 1 = 8, so 38 + 47 = 85."
        assert page.evaluate("sessionStorage.getItem('llama-api-key')") == "sekrit"
        assert page.evaluate("localStorage.length") == 0
        other_tab = browser.new_context().new_page()  # another tab's storage is its own
        other_tab.goto(served.url)
        expect(other_tab.locator("#key-form")).to_be_visible()


MARKUP = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script> [click](javascript:window.pwned=3)'


def test_markup_in_an_answer_or_a_message_stays_text(browser: Browser, demo: Served) -> None:
    page = open_page(browser, demo)
    ready(page)
    # The answer, as the server would stream it: the markup split across chunks.
    pieces = [MARKUP[:7], MARKUP[7:40], MARKUP[40:]]
    chunks = [{"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]} for piece in pieces]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(status=200, body=body,
                                                                         content_type="text/event-stream"))  # fmt: skip
    ask(page, MARKUP)
    assert finished_answer(page) == MARKUP
    expect(page.locator(".message.user")).to_have_text(MARKUP)
    assert page.locator("#conversation img, #conversation script, #conversation a").count() == 0
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None


def test_the_page_forbids_scripts_from_anywhere_but_itself(demo: Served) -> None:
    response = httpx.get(demo.url)
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe-inline" not in policy
    assert response.headers["content-type"].startswith("text/html")
    assert "<script>" not in response.text  # the page's own script is a file


def test_the_keyboard_alone_is_enough(browser: Browser, demo: Served) -> None:
    page = open_page(browser, demo)
    ready(page)
    setting(page, "#temperature", "0")
    page.focus("#message")
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    expect(page.locator("#message")).to_have_value("first line\nsecond line")
    page.fill("#message", SUM)
    page.keyboard.press("Enter")
    assert finished_answer(page) == "8 + 7 = 15, 3 + 4 + 1 = 8, so 38 + 47 = 85."
    page.keyboard.press("Shift+Tab")  # back from the message box to the settings, by keyboard
    assert page.evaluate("document.activeElement.tagName") in ("BUTTON", "SUMMARY", "INPUT", "TEXTAREA")


def test_the_page_fits_a_narrow_phone_screen(browser: Browser, demo: Served) -> None:
    page = open_page(browser, demo, viewport={"width": 360, "height": 640}, is_mobile=True)
    ready(page)
    setting(page, "#temperature", "0")
    ask(page, SUM)
    finished_answer(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    send = page.locator("#send").bounding_box()
    assert send["x"] + send["width"] <= 360
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "chat-page-phone.png", full_page=True)
