"""The dashboard in real headless Chromium against a real daemon: open it with the admin link,
stream a request from the prompt box, click kill on a worker of that request's route, and watch
the card turn dead, the route redrawn away from it, the request finish and the reroute logged.

Drives Debian's chromium (/usr/bin/chromium, which .ci/run installs) through Playwright's Python
package; Playwright's own browser downloads are never used. Saves test-artifacts/dashboard.png.
"""
from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.daemon_proc import REPO, running_daemon
from tests.tiny_models import make_tiny_model

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "dashboard-test-admin-token"
MAX_TOKENS = 1500  # long enough that the kill lands mid-stream
ARTIFACTS = REPO / "test-artifacts"

pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not os.path.exists(CHROMIUM) and not os.environ.get("CI"):
    pytestmark.append(pytest.mark.skip(reason=f"{CHROMIUM} is not installed (.ci/run installs it)"))


def daemon_args(model_dir: Path, tmp_path: Path) -> list[str]:
    conf = tmp_path / "kevlard.toml"
    conf.write_text(f'[server]\nadmin_token = "{TOKEN}"\n'
                    "[health]\nheartbeat_interval_s = 0.1\nheartbeat_timeout_s = 1.0\n")
    return ["--config", str(conf), "--model", str(model_dir), "--devices", "cpu:4",
            "--pipelines", "2", "--stages", "2", "--spares", "1"]


def route_of(page, pipeline: int) -> list[int]:
    text = page.get_attribute(f'.route-row[data-pipeline="{pipeline}"] .route', "data-route", timeout=5_000)
    return [int(w) for w in text.split(",")]


def serving_pipeline(url: str) -> int:
    """The pipeline that runs the one request: from the snapshot where it says, else pipeline 0,
    where the scheduler admits a lone request (ties go to the lowest id)."""
    pipelines = httpx.get(url + "/api/cluster", timeout=10).json()["pipelines"]
    busy = [p["id"] for p in pipelines if p.get("num_running")]
    return busy[0] if busy else 0


def test_kill_from_the_dashboard_reroutes_and_the_stream_finishes(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    model_dir = make_tiny_model(tmp_path, "llama", num_layers=4, max_position_embeddings=2048)
    ARTIFACTS.mkdir(exist_ok=True)
    with running_daemon(daemon_args(model_dir, tmp_path), tmp_path) as daemon, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(30_000)
            errors: list[str] = []
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            # the admin link trades the token for the cookie and drops it from the address bar
            page.goto(f"{daemon.url}/?token={TOKEN}")
            assert page.url == daemon.url + "/"
            expect(page.locator("body")).to_have_attribute("data-admin", "true")
            expect(page.locator(".card[data-worker]")).to_have_count(5)
            expect(page.locator(".card[data-state='spare']")).to_have_count(1)
            expect(page.locator("#conn")).to_have_class("conn open")

            # a long streamed request from the prompt box
            page.fill("#prompt-text", "Tell me a very long story about a fox.")
            page.fill("#prompt-max-tokens", str(MAX_TOKENS))
            page.check("#prompt-ignore-eos")
            page.click("#prompt-send")
            expect(page.locator("#prompt-status")).to_contain_text("streaming", timeout=60_000)

            pipeline = serving_pipeline(daemon.url)
            before = route_of(page, pipeline)
            victim = before[1]
            others = [route_of(page, p) for p in range(2) if p != pipeline]
            buddy = others[0][1]

            # kill it from its card while the request streams
            page.click(f'.card[data-worker="{victim}"] button.kill')
            card = page.locator(f'.card[data-worker="{victim}"]')
            expect(card).to_have_attribute("data-state", "dead")
            expect(card.locator("button.kill")).to_be_disabled()

            # the route is redrawn away from the dead worker: through the buddy, or already
            # through the spare that restored the stage
            page.wait_for_function(
                """([p, victim]) => {
                    const r = document.querySelector(`.route-row[data-pipeline="${p}"] .route`);
                    return r && !r.dataset.route.split(",").map(Number).includes(victim);
                }""", arg=[pipeline, victim])
            after = route_of(page, pipeline)
            assert after != before and victim not in after
            assert after[0] == before[0]
            note = page.locator(f'.route-row[data-pipeline="{pipeline}"] .route-note')
            expect(note).to_contain_text(f"w{victim} lost → via buddy w{buddy}")
            page.screenshot(path=str(ARTIFACTS / "dashboard-after-kill.png"))

            # the stream finishes with a finish reason, and the reroute is in the event log
            expect(page.locator("#prompt-status")).to_have_attribute("data-finish", "length", timeout=180_000)
            tokens = int(page.get_attribute("#prompt-status", "data-tokens"))
            assert tokens == MAX_TOKENS
            assert len(page.inner_text("#prompt-output")) > 0
            reroute = page.locator('#event-log li[data-kind="reroute"]')
            expect(reroute.first).to_contain_text(f"via buddy w{buddy}")
            expect(page.locator(f'#event-log li[data-kind="worker_state"]:has-text("w{victim} is dead")')).to_have_count(1)

            # the stage ends up on the buddy (still rerouted) or on the spare (restored)
            final = route_of(page, pipeline)
            assert final[1] == buddy or final[1] not in (*before, *others[0])
            page.wait_for_timeout(1_500)  # let the charts take a few more samples for the picture
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"))
            assert errors == [], f"errors in the page's console: {errors}"
        finally:
            browser.close()


def test_a_pipeline_with_a_worker_whose_heartbeats_are_late_shows_as_quiet(tmp_path):
    """A hung worker is judged only at the heartbeat timeout (here a minute); until then its
    pipeline is marked quiet, so the operator sees why new requests go to the other one."""
    from playwright.sync_api import expect, sync_playwright

    model_dir = make_tiny_model(tmp_path, "llama", num_layers=4)
    args = daemon_args(model_dir, tmp_path)
    conf = tmp_path / "kevlard.toml"
    conf.write_text(conf.read_text().replace("heartbeat_timeout_s = 1.0", "heartbeat_timeout_s = 60.0"))
    with running_daemon(args, tmp_path) as daemon, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(30_000)
            page.goto(f"{daemon.url}/?token={TOKEN}")
            expect(page.locator(".card[data-worker]")).to_have_count(5)
            quiet = page.locator(".route-row .pstate.quiet")
            expect(quiet).to_have_count(0)
            victim = route_of(page, 0)[1]
            r = httpx.post(daemon.url + "/api/faults", json={"worker": victim, "kind": "hang"},
                           headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 202, r.text
            expect(page.locator('.route-row[data-pipeline="0"] .pstate.quiet')).to_have_count(1)
            expect(quiet).to_have_count(1)  # the other pipeline is not
            expect(page.locator(f'.card[data-worker="{victim}"]')).not_to_have_attribute("data-state", "dead")
        finally:
            browser.close()


@pytest.mark.parametrize("web_locks", [True, False], ids=["web-locks", "no-web-locks"])
def test_many_tabs_of_one_browser_share_one_event_stream(tmp_path, web_locks):
    """A browser opens at most 6 HTTP/1.1 connections to a host and each /api/events stream holds
    one: with a stream per tab, the seventh tab's page (and the polls of all) stalled. The tabs of
    one browser share one stream; every tab still logs every event, also once the tab that held
    the stream is closed. Without Web Locks (a page over plain http from another host) the tabs
    elect a leader over their channel."""
    from playwright.sync_api import expect, sync_playwright

    model_dir = make_tiny_model(tmp_path, "llama", num_layers=4)
    with running_daemon(daemon_args(model_dir, tmp_path), tmp_path) as daemon, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 900})
            context.set_default_timeout(30_000)
            if not web_locks:
                context.add_init_script("Object.defineProperty(Navigator.prototype, 'locks', {get: () => undefined})")
            streams: list[str] = []
            context.on("request", lambda req: streams.append(req.url) if req.url.endswith("/api/events") else None)
            errors: list[str] = []
            pages = []
            for _ in range(8):
                page = context.new_page()
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(f"{daemon.url}/?token={TOKEN}")
                expect(page.locator("#conn")).to_have_class("conn open")
                pages.append(page)
            for page in pages:  # each tab's polls got through: the cards are drawn
                expect(page.locator(".card[data-worker]")).to_have_count(5)
                expect(page.locator("#conn")).to_have_class("conn open")

            def inject_and_see(worker: int, tabs) -> None:
                r = httpx.post(daemon.url + "/api/faults", json={"worker": worker, "kind": "slow", "duration_s": 0.5},
                               headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
                assert r.status_code == 202, r.text
                for page in tabs:
                    expect(page.locator(f"#event-log li[data-kind='fault_injected']",
                                        has_text=f"w{worker}")).to_have_count(1)

            inject_and_see(0, pages)
            assert len(streams) == 1, streams
            pages[0].close()  # the tab holding the stream: another one takes it over
            inject_and_see(1, pages[1:])
            assert len(streams) == 2, streams
            assert errors == [], errors
        finally:
            browser.close()
