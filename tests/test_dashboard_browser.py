"""The web dashboard in a real browser: a real redis-server, a ``redis-batcher worker`` and the
``redis-batcher dashboard`` subprocess with a token, driven through Playwright in Debian's
chromium (``/usr/bin/chromium``; never Playwright's own browser download). It loads every page,
logs in, pauses a processor, flushes a batch id and replays a dead letter through the UI and
checks what the pages show afterwards, the live refresh without a reload, and a phone's width.

Screenshots go to ``$REDIS_BATCHER_SCREENSHOTS`` (``docs`` from the repository's root writes
docs/dashboard-*.png), else into the test's tmp dir so that a run leaves the tree clean."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from playwright.sync_api import Page, expect, sync_playwright

from redis_batcher.testing import RedisServer, free_port

from .apps import dashboard_app
from .conftest import ROOT, cli_command, subprocess_env

pytestmark = pytest.mark.slow

TOKEN = "browser-test-token"
# how long the browser waits for what a worker does or a refresh shows (a bound, not a measure)
WAIT_MS = 30_000
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium")) if p and os.path.exists(p)), None)
APP = "tests.apps.dashboard_app:batcher"


def screenshot_dir(tmp_path: Path) -> Path:
    wanted = os.environ.get("REDIS_BATCHER_SCREENSHOTS")
    if not wanted:
        return tmp_path
    found = Path(wanted) if Path(wanted).is_absolute() else ROOT / wanted
    found.mkdir(parents=True, exist_ok=True)
    return found


def wait_until(check: Any, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.1)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture
def stack(
    redis_server: RedisServer, real_client: redis.Redis, cli_procs: list[subprocess.Popen[bytes]]
) -> Iterator[str]:
    """A worker and the dashboard (with a token) of the test app; the dashboard's base URL.
    Before they start: a crm flush that fails (a dead letter once the worker runs), three
    items accumulating in orders' ``cart:7`` and a running ``walk`` job."""
    if CHROMIUM is None:
        pytest.skip("no chromium binary: apt-get install chromium (Debian) to run the browser test")
    batcher = dashboard_app.batcher
    batcher.connect(redis_server.url)
    real_client.set(dashboard_app.FAIL_KEY, 1)
    dashboard_app.crm.add("acct:1", {"account": 1, "plan": "pro"})
    dashboard_app.orders.add_many("cart:7", [{"sku": "A-1", "qty": 2}, {"sku": "B-9", "qty": 1}, "gift wrap"])
    dashboard_app.Walk.start("backfill-2026", {"since": "2026-01-01"})
    env = subprocess_env(redis_server.url)
    worker = [*cli_command("worker", APP, "--redis-url", redis_server.url, "--beat-interval", "1")]
    cli_procs.append(subprocess.Popen([*worker, "--max-idle-wait", "0.2"], cwd=ROOT, env=env))
    port = free_port()
    dashboard = cli_command(
        "dashboard", APP, "--redis-url", redis_server.url, "--port", str(port), "--token", TOKEN
    )
    cli_procs.append(
        subprocess.Popen([*dashboard, "--sample-interval", "1", "--refresh", "1"], cwd=ROOT, env=env)
    )
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: answers(base + "/login"), "the dashboard to answer")
    wait_until(lambda: bool(dashboard_app.crm.dead_letters()), "the crm flush to fail into a dead letter")
    try:
        yield base
    finally:
        for proc in cli_procs:
            proc.terminate()
        for proc in cli_procs:
            proc.wait(20)
        batcher.close()


@pytest.fixture
def page() -> Iterator[Page]:
    assert CHROMIUM is not None
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 860})
        finally:
            browser.close()


def test_the_dashboard_in_chromium(stack: str, page: Page, real_client: redis.Redis, tmp_path: Path) -> None:
    shots = screenshot_dir(tmp_path)
    page.set_default_timeout(WAIT_MS)
    flash = page.locator("#flash")

    # the token's login form guards every page
    page.goto(stack + "/")
    expect(page).to_have_url(f"{stack}/login?next=%2F")
    page.fill("#token", TOKEN)
    page.click("button[type=submit]")
    expect(page).to_have_url(stack + "/")
    for name in ("orders", "crm"):
        expect(page.locator(f'tr[data-processor="{name}"]')).to_be_visible()
    expect(page.locator("#workers tbody tr")).to_have_count(1)  # the worker's heartbeat

    # pause: the processor page says so, and Redis agrees
    page.goto(stack + "/processor?name=orders")
    expect(page.locator('tr[data-batch-id="cart:7"]')).to_contain_text("0: accumulating (3)")
    page.click("#paused-state button:has-text('Pause')")
    expect(flash).to_have_text("paused orders")
    expect(page.locator("#paused-state")).to_contain_text("paused")
    assert dashboard_app.orders.paused()
    page.screenshot(path=str(shots / "dashboard-processor.png"), full_page=True)

    # flush now: sealed, and held while the processor is paused
    page.goto(stack + "/batch?processor=orders&id=cart:7")
    expect(page.locator("ol.items li")).to_have_count(3)
    expect(page.locator("ol.items")).to_contain_text('{"qty": 2, "sku": "A-1"}')
    page.click("button:has-text('Flush now')")
    expect(flash).to_have_text("flushed cart:7::0 (3 items)")
    expect(page.locator('article[data-sequence="0"] .seq')).to_have_text("flushing")
    expect(page.locator("p.warn")).to_contain_text("paused")
    page.screenshot(path=str(shots / "dashboard-batch.png"), full_page=True)

    # resume: the worker delivers it, and the batch page's live part shows it without a reload
    page.goto(stack + "/processor?name=orders")
    page.click("#paused-state button:has-text('Resume')")
    expect(flash).to_have_text("resumed orders")
    assert not dashboard_app.orders.paused()
    page.goto(stack + "/batch?processor=orders&id=cart:7")
    page.evaluate("window.notReloaded = true")
    expect(page.locator("#history tbody tr.ok")).to_have_count(1)
    expect(page.locator("#history tbody tr.ok td").nth(1)).to_have_text("3")
    dashboard_app.orders.add("cart:7", "late item")  # appears by the refresh alone
    expect(page.locator('article[data-sequence="1"]')).to_contain_text("accumulating")
    assert page.evaluate("window.notReloaded === true")

    # replay: the dead letter goes, and its batch id is delivered once the crm accepts it
    page.goto(stack + "/dead")
    [letter] = dashboard_app.crm.dead_letters()
    row = page.locator(f'tr[data-dead-id="{letter.id}"]')
    expect(row).to_contain_text("RuntimeError: crm rejected acct:1")
    page.screenshot(path=str(shots / "dashboard-dead.png"), full_page=True)
    page.click(f'a:has-text("{letter.id}")')
    expect(page.locator("ol.items")).to_contain_text('{"account": 1, "plan": "pro"}')
    real_client.delete(dashboard_app.FAIL_KEY)
    page.click("button:has-text('Replay')")
    expect(flash).to_contain_text(f"replayed {letter.id} as sequence 1")
    page.goto(stack + "/dead")
    expect(page.locator("#no-dead")).to_be_visible()
    page.goto(stack + "/batch?processor=crm&id=acct:1")
    expect(page.locator("#history tbody tr.ok")).to_have_count(1)

    # iterator jobs: the running job, paused from its row
    page.goto(stack + "/jobs")
    job = page.locator('tr[data-job-id="backfill-2026"]')
    expect(job.locator(".job-status")).to_have_text("running")
    job.locator("button:has-text('Pause')").click()
    expect(flash).to_have_text("job backfill-2026 of walk: paused")
    expect(page.locator('tr[data-job-id="backfill-2026"] .job-status')).to_have_text("paused")

    page.goto(stack + "/workers")
    expect(page.locator("#workers tbody tr")).to_have_count(1)
    expect(page.locator("#workers tbody tr")).to_contain_text("orders, crm")

    # the overview, with the flushes of the last seconds in its charts
    page.goto(stack + "/")
    expect(page.locator('tr[data-processor="orders"] svg polyline.fl')).to_have_count(1)
    page.screenshot(path=str(shots / "dashboard-overview.png"), full_page=True)

    # a phone's width: nothing wider than the screen
    page.set_viewport_size({"width": 390, "height": 844})
    for path in (
        "/",
        "/processor?name=orders",
        "/batch?processor=orders&id=cart:7",
        "/dead",
        "/jobs",
        "/workers",
    ):
        page.goto(stack + path)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, (path, width)
    page.goto(stack + "/")
    page.screenshot(path=str(shots / "dashboard-phone.png"), full_page=True)
    for name in ("overview", "processor", "batch", "dead", "phone"):
        assert (shots / f"dashboard-{name}.png").stat().st_size > 5_000
