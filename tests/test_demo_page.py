"""The demo page in headless Chromium: two people chat through it on a real server."""

from __future__ import annotations

import pytest

from tests.support.requirements import require_tool

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture
async def browser():
    """Headless Chromium; skipped when it is missing, except under CI=true (a failure)."""
    from playwright.async_api import async_playwright

    chromium = require_tool("chromium", "chromium")
    async with async_playwright() as playwright:
        instance = await playwright.chromium.launch(executable_path=chromium, args=ARGS)
        yield instance
        await instance.close()


async def sign_in(browser, url: str, user: str, room: str):
    page = await browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(url)
    await page.fill("#user", user)
    await page.click("#login-form button")
    await page.wait_for_selector("#status.ok")
    await page.fill("#room", room)
    await page.click("#join-form button")
    await page.wait_for_selector("#text:not([disabled])")
    page.errors = errors
    return page


async def test_two_people_chat_through_the_demo_page(browser, server, uid):
    room, alice_id, bob_id = uid("room"), uid("alice"), uid("bob")
    alice = await sign_in(browser, server.url, alice_id, room)
    bob = await sign_in(browser, server.url, bob_id, room)
    assert await alice.text_content("#room-info") == "public · last seq 0"

    await alice.fill("#text", "hello from the page")
    await alice.click("#send-form button")
    await bob.wait_for_selector("#messages li:has-text('hello from the page')", timeout=5000)
    assert await alice.input_value("#text") == ""

    await bob.fill("#text", "typing something")
    await alice.wait_for_selector(f"#typing:has-text('{bob_id} typing')", timeout=5000)
    await bob.click("#send-form button")
    await alice.wait_for_selector("#messages li:has-text('typing something')", timeout=5000)
    await alice.wait_for_selector(f"#members li.online[data-user='{bob_id}']", timeout=5000)
    assert await alice.locator("#messages li").count() == 2
    assert [
        await li.get_attribute("data-seq") for li in await alice.locator("#messages li").all()
    ] == ["1", "2"]

    await bob.close()  # bob leaves: the testing grace period is 2 s
    await alice.wait_for_selector(f"#members li.offline[data-user='{bob_id}']", timeout=8000)
    assert alice.errors == []
