"""The demo page in headless Chromium: two instances on Redis, browsers on different ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.requirements import require_tool
from tests.support.servers import ROOT, deployment

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = ROOT / ".run" / "artifacts"
WAIT = 30_000  # ms: Chromium, two servers and Redis share two cores that may be loaded


@pytest.fixture(scope="module")
async def browser():
    """Headless Chromium; skipped when it is missing, except under CI=true (a failure)."""
    from playwright.async_api import async_playwright

    chromium = require_tool("chromium", "chromium")
    async with async_playwright() as playwright:
        instance = await playwright.chromium.launch(executable_path=chromium, args=ARGS)
        yield instance
        await instance.close()


@pytest.fixture(scope="module")
def pair(redis_url, tmp_path_factory):
    """Two instances on one Redis and one SQLite file, as behind a load balancer."""
    with deployment(redis_url, tmp_path_factory.mktemp("demo"), 2, "demo") as servers:
        yield servers


async def sign_in(browser, url: str, user: str, width: int = 1280, height: int = 800):
    context = await browser.new_context(viewport={"width": width, "height": height})
    page = await context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("dialog", lambda dialog: None)  # answered per test
    await page.goto(url)
    await page.fill("#user", user)
    await page.click("#login-form button")
    await page.wait_for_selector("#banner.connected", timeout=WAIT)
    return page


async def join(page, room: str) -> None:
    await page.fill("#join-room", room)
    await page.click("#join-form button")
    try:
        await page.wait_for_selector(
            f"#rooms li[data-room='{room}'] button[aria-current='true']", timeout=WAIT
        )
    except Exception as exc:  # say what the page showed instead
        error = await page.text_content("#sidebar-error")
        rooms = await page.inner_html("#rooms")
        raise AssertionError(
            f"{room} not open: sidebar error {error!r}, page errors {page.errors}, rooms {rooms}"
        ) from exc


async def send(page, text: str) -> None:
    await page.fill("#text", text)
    await page.press("#text", "Enter")


def message(page, text: str):
    return page.locator("#messages .msg", has_text=text)


async def test_two_browsers_on_two_instances_chat_edit_delete_react_and_reply(browser, pair, uid):
    room, alice_id, bob_id = uid("room"), uid("alice"), uid("bob")
    alice = await sign_in(browser, pair[0].url, alice_id)
    bob = await sign_in(browser, pair[1].url, bob_id)
    assert await alice.get_attribute("#whoami", "data-instance") == "demo-0"
    assert await bob.get_attribute("#whoami", "data-instance") == "demo-1"
    await join(alice, room)
    await join(bob, room)

    await send(alice, f"hello @{bob_id}")
    await message(bob, "hello").wait_for(timeout=WAIT)
    assert await message(bob, "hello").locator(".mention-me").text_content() == f"@{bob_id}"
    await alice.wait_for_selector("#messages .msg.mine[data-seq='1']", timeout=WAIT)  # confirmed

    await alice.wait_for_selector(f"#members li.online[data-user='{bob_id}']", timeout=WAIT)
    await bob.type("#text", "typing")
    await alice.wait_for_selector(f"#typing:has-text('{bob_id} is typing')", timeout=WAIT)
    await bob.fill("#text", "")

    hello = bob.locator("#messages .msg[data-seq='1']")
    await hello.hover()
    await hello.locator("[data-react='👍']").click()
    await alice.wait_for_selector(
        "#messages .msg[data-seq='1'] .reactions button:has-text('👍 1')", timeout=WAIT
    )

    await hello.hover()
    await hello.locator("button[aria-label='reply']").click()
    await send(bob, "a reply")
    reply = message(alice, "a reply")
    await reply.wait_for(timeout=WAIT)
    assert "hello" in await reply.locator(".quote").text_content()

    alice.once("dialog", lambda dialog: dialog.accept("hello, edited"))
    mine = alice.locator("#messages .msg[data-seq='1']")
    await mine.hover()
    await mine.locator("button.edit").click()
    await bob.wait_for_selector(
        "#messages .msg[data-seq='1']:has-text('hello, edited')", timeout=WAIT
    )
    assert await bob.locator("#messages .msg[data-seq='1'] .edited").count() == 1

    await send(alice, "short-lived")
    doomed = message(alice, "short-lived")
    await doomed.wait_for(timeout=WAIT)
    await bob.wait_for_selector("#messages .msg:has-text('short-lived')", timeout=WAIT)
    alice.once("dialog", lambda dialog: dialog.accept())
    await doomed.hover()
    await doomed.locator("button.delete").click()
    await bob.wait_for_selector("#messages .msg.deleted:has-text('message deleted')", timeout=WAIT)

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await alice.screenshot(path=str(ARTIFACTS / "demo-desktop.png"))
    await alice.set_viewport_size({"width": 390, "height": 844})
    await alice.wait_for_timeout(500)  # the sidebar slides out of view
    await alice.screenshot(path=str(ARTIFACTS / "demo-phone.png"))
    assert await alice.is_visible("#toggle-sidebar")
    await alice.click("#toggle-sidebar")
    await alice.wait_for_selector("#sidebar.open", timeout=WAIT)
    assert alice.errors == [] and bob.errors == []


async def test_a_dropped_tab_recovers_what_it_missed_without_duplicates(browser, pair, uid):
    room, alice_id, bob_id = uid("room"), uid("alice"), uid("bob")
    alice = await sign_in(browser, pair[0].url, alice_id)
    bob = await sign_in(browser, pair[1].url, bob_id)
    await join(alice, room)
    await join(bob, room)
    await send(alice, "before the drop")
    await message(bob, "before the drop").wait_for(timeout=WAIT)

    await bob.evaluate("chat.socket.io.reconnection(false); chat.socket.io.engine.close()")
    await bob.wait_for_selector("#banner.offline", timeout=WAIT)
    for i in range(3):
        await send(alice, f"while away {i}")
    await alice.wait_for_selector("#messages .msg.mine[data-seq='4']", timeout=WAIT)
    first = alice.locator("#messages .msg[data-seq='1']")
    await first.hover()
    await first.locator("[data-react='🎉']").click()
    await alice.wait_for_selector("#messages .msg[data-seq='1'] .reactions button.me", timeout=WAIT)

    await bob.evaluate("chat.socket.io.reconnection(true); chat.socket.connect()")
    await bob.wait_for_selector("#banner.connected", timeout=WAIT)
    await bob.wait_for_selector("#messages .msg[data-seq='4']", timeout=WAIT)
    await bob.wait_for_selector(
        "#messages .msg[data-seq='1'] .reactions button:has-text('🎉 1')", timeout=WAIT
    )
    seqs = await bob.eval_on_selector_all(
        "#messages .msg[data-seq]", "ns => ns.map(n => n.dataset.seq)"
    )
    assert seqs == ["1", "2", "3", "4"]  # each once, in order, without a reload
    assert bob.errors == []


async def test_unread_badges_follow_reads_from_the_users_other_tab(browser, pair, uid):
    room, lobby, alice_id, bob_id = uid("room"), uid("lobby"), uid("alice"), uid("bob")
    alice = await sign_in(browser, pair[0].url, alice_id)
    bob_one = await sign_in(browser, pair[0].url, bob_id)
    bob_two = await sign_in(browser, pair[1].url, bob_id)
    await join(alice, room)
    for tab in (bob_one, bob_two):
        await join(tab, room)
        await join(tab, lobby)  # the room is listed but not open in either tab
    await send(alice, f"ping @{bob_id}")
    await send(alice, "and another")
    for tab in (bob_one, bob_two):
        await tab.wait_for_selector(
            f"#rooms li[data-room='{room}'] .badge[data-kind='unread']:has-text('2')", timeout=WAIT
        )
        await tab.wait_for_selector(
            f"#rooms li[data-room='{room}'] .badge[data-kind='mentions']", timeout=WAIT
        )
    await bob_two.click(f"#rooms li[data-room='{room}'] button")
    await message(bob_two, "and another").wait_for(timeout=WAIT)
    await bob_one.wait_for_selector(
        f"#rooms li[data-room='{room}'] button:not(:has(.badge))", timeout=WAIT
    )
    assert bob_one.errors == [] and bob_two.errors == []


def test_the_page_loads_nothing_from_another_host():
    html = (ROOT / "client-demo" / "index.html").read_text()
    sources = [part.split('"')[1] for part in html.split(" src=")[1:]]
    sources += [part.split('"')[1] for part in html.split(" href=")[1:]]
    assert sources and all(s.startswith(("/static/", "data:")) for s in sources), sources
    vendor = (ROOT / "client-demo" / "vendor" / "README.md").read_text()
    assert "socket.io-client 4.8.4" in vendor
    assert Path(ROOT / "client-demo" / "vendor" / "socket.io.min.js").stat().st_size > 10_000
