"""The chat page in a real headless Chromium (Debian's, driven by Playwright): upload an image, ask, watch the answer
stream in, ask again with the history, start over. A screenshot is saved as a test artifact."""

from __future__ import annotations

import os

import httpx
import pytest
from conftest import fixture_path
from playwright.sync_api import expect, sync_playwright
from serve_helpers import API_KEY, MODEL_NAME, QUESTION, data_uri, shared_server

CHROMIUM = os.environ.get("LLAVA_LITE_CHROMIUM", "/usr/bin/chromium")  # Debian's; `tools/test.sh` installs it
CHROMIUM_FLAGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    return shared_server(request.config, tmp_path_factory)


def api_answer(server, messages: list[dict]) -> str:
    body = {"model": MODEL_NAME, "messages": messages}  # no max_tokens: the server's default, as the page sends
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers(), timeout=120)
    return reply.json()["choices"][0]["message"]["content"]


def test_chat_page_streams_answers_about_an_uploaded_image(server, tmp_path_factory, record_property):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no Chromium at {CHROMIUM}: run the tests with tools/test.sh, which installs Debian's chromium")
    image = fixture_path("images", "waterview.jpg")
    screenshot = tmp_path_factory.mktemp("chat-page") / "chat-page.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(server.url)
            page.fill("#api-key", API_KEY)
            page.dispatch_event("#api-key", "change")
            expect(page.locator("#model")).to_have_text(MODEL_NAME)

            page.set_input_files("#image-input", image)
            expect(page.locator("#preview")).to_be_visible()
            page.fill("#prompt", QUESTION)
            page.click("#send")
            expect(page.locator(".message.user img")).to_have_count(1)
            first = page.locator(".message.assistant").nth(0)
            expect(page.locator("#status")).to_have_attribute("data-state", "idle", timeout=120_000)
            first_text = first.locator(".text").text_content()
            assert int(first.get_attribute("data-chunks")) > 1  # it came in pieces, as they were generated
            page.screenshot(path=str(screenshot), full_page=True)

            page.fill("#prompt", "What colours are in it?")
            page.press("#prompt", "Enter")
            expect(page.locator(".message.assistant")).to_have_count(2)
            expect(page.locator("#status")).to_have_attribute("data-state", "idle", timeout=120_000)
            second_text = page.locator(".message.assistant").nth(1).locator(".text").text_content()

            page.click("#new-chat")
            expect(page.locator(".message")).to_have_count(0)
        finally:
            browser.close()

    print(f"chat page screenshot: {screenshot}")
    record_property("screenshot", str(screenshot))
    assert screenshot.stat().st_size > 0
    # What the page showed is what the API answers for the same image, question and history.
    photo = data_uri(image)
    turn = {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": photo}}, {"type": "text", "text": QUESTION}],
    }
    assert first_text and first_text == api_answer(server, [turn])
    follow_up = [
        turn,
        {"role": "assistant", "content": first_text},
        {"role": "user", "content": "What colours are in it?"},
    ]
    assert second_text and second_text == api_answer(server, follow_up)
