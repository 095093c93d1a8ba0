"""The guard's screen in headless Chromium, driven by a real daemon fed with real codes.

Set EDGENODE_SCREENSHOTS=docs/screens to refresh the committed screenshots; otherwise they go
to the test's temporary folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from playwright.sync_api import Browser, Page, expect, sync_playwright

from edgenode.config import ConfigError
from edgenode.guards import GuardStore
from edgenode.id_numbers import id_number_hash, new_id_lookup_key, write_id_lookup_key
from edgenode.journal import Journal
from edgenode.policy import ClockReading
from edgenode.sources import SourceState
from tests.scenarios import (
    DAY,
    PEOPLE,
    DirectMinter,
    Scenario,
    Site,
    build_cache,
    site_config,
)
from tests.screen_gate import PushSource, ScreenGate, free_port
from tests.test_run_command import write_config

CHROMIUM = Path("/usr/bin/chromium")
EXPECT_TIMEOUT_MS = 15_000
VIEWPORT = {"width": 1280, "height": 800}

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium package is not installed (scripts/setup)"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport=VIEWPORT, locale="zh-CN")
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site.create(tmp_path, int(time.time()), DirectMinter())


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("EDGENODE_SCREENSHOTS") or tmp_path / "screens")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def start_gate(
    site: Site,
    *,
    scenario: Scenario | None = None,
    source: PushSource | None = None,
    screen: dict[str, Any] | None = None,
    **options: Any,
) -> tuple[ScreenGate, PushSource]:
    sections: dict[str, Any] = {
        "screen": {"enabled": True, "port": free_port(), "clear_after_s": 60, **(screen or {})}
    }
    if "language" in options:
        sections["display"] = {"language": options.pop("language")}
    if "guard" in options:
        sections["guard"] = options.pop("guard")
    config = site_config(site, **sections)
    build_cache(site, scenario or Scenario([]), config)
    source = source or PushSource()
    return ScreenGate(config, [source], **options).start(), source


@pytest.fixture
def gate_factory() -> Iterator[list[ScreenGate]]:
    started: list[ScreenGate] = []
    yield started
    for gate in started:
        gate.stop()


def open_screen(page: Page, gate: ScreenGate) -> None:
    page.goto(gate.url)
    # The hello message has arrived once the labels are filled in.
    expect(page.locator("#idle-text")).not_to_be_empty(timeout=EXPECT_TIMEOUT_MS)


def expect_verdict(page: Page, outcome_class: str, word: str) -> None:
    expect(page.locator("body")).to_have_class(outcome_class, timeout=EXPECT_TIMEOUT_MS)
    expect(page.locator("#word")).to_have_text(word, timeout=EXPECT_TIMEOUT_MS)


def expect_banner(page: Page, code: str) -> None:
    expect(page.locator(f'#banners [data-code="{code}"]')).to_be_visible(timeout=EXPECT_TIMEOUT_MS)


# --- verdicts ---


VERDICTS = {
    "admit": (lambda s: s.pair("alice"), "admit", "通行"),
    "review": (lambda s: s.pair("visitor"), "review", "请人工核验"),
    "deny": (lambda s: s.pair("alice", colour="red"), "deny", "禁止通行"),
    "unrecognised": (lambda s: ["https://example.com/menu?table=12"], "unrecognised", "未识别"),
}


@pytest.mark.parametrize("name", list(VERDICTS))
def test_verdict_fills_screen(
    name: str, site: Site, page: Page, gate_factory: list[ScreenGate], screenshots: Path
) -> None:
    codes, outcome_class, word = VERDICTS[name]
    gate, source = start_gate(site)
    gate_factory.append(gate)
    open_screen(page, gate)
    source.push(*codes(site))
    expect_verdict(page, outcome_class, word)
    if outcome_class != "unrecognised":
        # Wait for today's counts too, so the screenshot shows them with the verdict.
        expect(page.locator(f"#count-{outcome_class}")).to_have_text("1")
    page.screenshot(path=str(screenshots / f"verdict-{name}.png"))


def test_admit_shows_masked_name_building_and_role(
    site: Site, page: Page, gate_factory: list[ScreenGate]
) -> None:
    gate, source = start_gate(site)
    gate_factory.append(gate)
    open_screen(page, gate)
    source.push(*site.pair("alice"))
    expect(page.locator("#name")).to_have_text("张*丰", timeout=EXPECT_TIMEOUT_MS)
    expect(page.locator("#place")).to_have_text("3 号楼 1201 室")
    expect(page.locator("#role")).to_have_text("住户")


def test_deny_lists_reason_in_chinese(
    site: Site, page: Page, gate_factory: list[ScreenGate]
) -> None:
    gate, source = start_gate(site)
    gate_factory.append(gate)
    open_screen(page, gate)
    source.push(*site.pair("alice", colour="red"))
    expect(page.locator("#reasons li").first).to_have_text("健康码红码", timeout=EXPECT_TIMEOUT_MS)


def test_verdict_clears_after_configured_time(
    site: Site, page: Page, gate_factory: list[ScreenGate]
) -> None:
    gate, source = start_gate(site, screen={"clear_after_s": 1})
    gate_factory.append(gate)
    open_screen(page, gate)
    source.push(*site.pair("alice"))
    expect_verdict(page, "admit", "通行")
    expect(page.locator("body")).to_have_class("idle", timeout=EXPECT_TIMEOUT_MS)


def test_english_from_config(site: Site, page: Page, gate_factory: list[ScreenGate]) -> None:
    gate, source = start_gate(site, language="en")
    gate_factory.append(gate)
    open_screen(page, gate)
    source.push(*site.pair("alice", colour="red"))
    expect_verdict(page, "deny", "Do not admit")


def test_counts_today_follow_verdicts(
    site: Site, page: Page, gate_factory: list[ScreenGate]
) -> None:
    gate, source = start_gate(site)
    gate_factory.append(gate)
    open_screen(page, gate)
    source.push(*site.pair("alice"))
    expect(page.locator("#count-admit")).to_have_text("1", timeout=EXPECT_TIMEOUT_MS)
    source.push(*site.pair("bob", colour="red"))
    expect(page.locator("#count-deny")).to_have_text("1", timeout=EXPECT_TIMEOUT_MS)


def test_data_age_is_always_shown(site: Site, page: Page, gate_factory: list[ScreenGate]) -> None:
    gate, _ = start_gate(site)
    gate_factory.append(gate)
    open_screen(page, gate)
    expect(page.locator("#data-age")).to_contain_text("数据更新于", timeout=EXPECT_TIMEOUT_MS)


# --- banners ---


class BrokerDown:
    connected = False


def test_stale_data_banner(
    site: Site, page: Page, gate_factory: list[ScreenGate], screenshots: Path
) -> None:
    gate, _ = start_gate(site, scenario=Scenario([], snapshot_age_s=2 * DAY))
    gate_factory.append(gate)
    open_screen(page, gate)
    expect_banner(page, "data_stale")
    page.screenshot(path=str(screenshots / "banner-data-stale.png"))


def test_disconnected_scanner_banner(
    site: Site, page: Page, gate_factory: list[ScreenGate], screenshots: Path
) -> None:
    source = PushSource("wedge-scanner", state=SourceState.DISCONNECTED)
    gate, _ = start_gate(site, source=source)
    gate_factory.append(gate)
    open_screen(page, gate)
    expect_banner(page, "source_disconnected")
    expect(page.locator("#banners")).to_contain_text("wedge-scanner")
    page.screenshot(path=str(screenshots / "banner-source-disconnected.png"))


def test_network_down_banner(
    site: Site, page: Page, gate_factory: list[ScreenGate], screenshots: Path
) -> None:
    gate, _ = start_gate(site, network=BrokerDown())
    gate_factory.append(gate)
    open_screen(page, gate)
    expect_banner(page, "network_down")
    page.screenshot(path=str(screenshots / "banner-network-down.png"))


def test_untrusted_clock_banner(
    site: Site, page: Page, gate_factory: list[ScreenGate], screenshots: Path
) -> None:
    gate, _ = start_gate(site, clock=lambda: ClockReading(time.time(), synchronised=False))
    gate_factory.append(gate)
    open_screen(page, gate)
    expect_banner(page, "clock_untrusted")
    page.screenshot(path=str(screenshots / "banner-clock-untrusted.png"))


def test_page_reconnects_after_daemon_restart(
    site: Site, page: Page, gate_factory: list[ScreenGate], screenshots: Path
) -> None:
    gate, _ = start_gate(site)
    open_screen(page, gate)
    gate.stop()
    expect_banner(page, "screen_offline")
    page.screenshot(path=str(screenshots / "banner-screen-offline.png"))

    source = PushSource()
    restarted = ScreenGate(gate.config, [source]).start()
    gate_factory.append(restarted)
    expect(page.locator('#banners [data-code="screen_offline"]')).to_have_count(
        0, timeout=EXPECT_TIMEOUT_MS
    )
    source.push(*site.pair("alice"))
    expect_verdict(page, "admit", "通行")


# --- the guard's actions ---


ID_NUMBER = "11010519491231002X"
GUARD_ID = "g01"
GUARD_PIN = "246810"


def with_id_number(site: Site, person: str, id_number: str, key: bytes) -> Scenario:
    """A scenario whose roster carries the keyed hash of one resident's ID number."""
    subject = PEOPLE[person].subject.hex()
    (record,) = [
        r for r in site.base_records() if r["dataset"] == "residents" and r["subject"] == subject
    ]
    return Scenario([], [{**record, "id_hash": id_number_hash(key, id_number).hex()}])


def test_id_number_check_shows_resident(
    site: Site, page: Page, gate_factory: list[ScreenGate], screenshots: Path
) -> None:
    key = new_id_lookup_key()
    key_file = site.folder / "id-lookup.key"
    write_id_lookup_key(key_file, key)
    gate, _ = start_gate(
        site,
        scenario=with_id_number(site, "alice", ID_NUMBER, key),
        guard={"id_lookup_key_file": str(key_file)},
    )
    gate_factory.append(gate)
    open_screen(page, gate)
    page.locator("#id-check-button").click()
    page.locator("#id-number").fill(ID_NUMBER.lower())
    page.locator("#id-check-dialog button[type=submit]").click()
    expect(page.locator("#name")).to_have_text("张*丰", timeout=EXPECT_TIMEOUT_MS)
    expect(page.locator("#place")).to_have_text("3 号楼 1201 室")
    expect(page.locator("#id-check-dialog")).not_to_be_visible()
    page.screenshot(path=str(screenshots / "id-number-check.png"))


def test_sign_in_and_override_flow(
    site: Site, page: Page, gate_factory: list[ScreenGate], screenshots: Path
) -> None:
    gate, source = start_gate(site)
    gate_factory.append(gate)
    GuardStore(gate.config.guards_path).add(GUARD_ID, GUARD_PIN)
    open_screen(page, gate)

    page.locator("#sign-in-button").click()
    page.locator("#guard-id").fill(GUARD_ID)
    page.locator("#pin").fill(GUARD_PIN)
    page.locator("#sign-in-dialog button[type=submit]").click()
    expect(page.locator("#guard")).to_have_text("值班门卫：g01", timeout=EXPECT_TIMEOUT_MS)
    expect(page.locator("#sign-out-button")).to_be_visible()

    source.push(*site.pair("visitor"))
    expect_verdict(page, "review", "请人工核验")
    page.locator("#override-admit-button").click()
    page.locator("#override-reason").select_option("visitor_confirmed_by_host")
    page.screenshot(path=str(screenshots / "override-form.png"))
    page.locator("#override-dialog button[type=submit]").click()
    expect(page.locator("#override-result")).to_have_text(
        "门卫 g01 已放行：被访住户已确认访客", timeout=EXPECT_TIMEOUT_MS
    )
    expect(page.locator("#override-admit-button")).to_be_hidden()

    gate.stop()
    gate_factory.remove(gate)
    with Journal(gate.config.journal_path, "gate-test") as journal:
        kinds = [record.kind for record, _, _ in journal.records()]
    assert kinds == ["verdict", "override"]


def test_wrong_pin_shows_error_on_page(
    site: Site, page: Page, gate_factory: list[ScreenGate]
) -> None:
    gate, _ = start_gate(site)
    gate_factory.append(gate)
    GuardStore(gate.config.guards_path).add(GUARD_ID, GUARD_PIN)
    open_screen(page, gate)
    page.locator("#sign-in-button").click()
    page.locator("#guard-id").fill(GUARD_ID)
    page.locator("#pin").fill("135790")
    page.locator("#sign-in-dialog button[type=submit]").click()
    error = page.locator("#sign-in-dialog .error")
    expect(error).to_have_attribute("data-code", "wrong_pin", timeout=EXPECT_TIMEOUT_MS)
    expect(error).to_have_text("PIN 码错误")
    expect(page.locator("#guard")).to_have_text("门卫未签到")


def test_malformed_id_number_shows_error_on_page(
    site: Site, page: Page, gate_factory: list[ScreenGate]
) -> None:
    gate, _ = start_gate(site)
    gate_factory.append(gate)
    open_screen(page, gate)
    page.locator("#id-check-button").click()
    page.locator("#id-number").fill("12345")
    page.locator("#id-check-dialog button[type=submit]").click()
    error = page.locator("#id-check-dialog .error")
    expect(error).to_have_attribute("data-code", "id_number_malformed", timeout=EXPECT_TIMEOUT_MS)
    expect(error).to_contain_text("18")


def test_override_without_sign_in_is_rejected_on_page(
    site: Site, page: Page, gate_factory: list[ScreenGate]
) -> None:
    gate, source = start_gate(site)
    gate_factory.append(gate)
    open_screen(page, gate)
    source.push(*site.pair("visitor"))
    expect_verdict(page, "review", "请人工核验")
    page.locator("#override-admit-button").click()
    page.locator("#override-dialog button[type=submit]").click()
    error = page.locator("#override-dialog .error")
    expect(error).to_have_attribute("data-code", "not_signed_in", timeout=EXPECT_TIMEOUT_MS)


def test_admit_offers_no_override(site: Site, page: Page, gate_factory: list[ScreenGate]) -> None:
    gate, source = start_gate(site)
    gate_factory.append(gate)
    open_screen(page, gate)
    source.push(*site.pair("alice"))
    expect_verdict(page, "admit", "通行")
    expect(page.locator("#override-admit-button")).to_be_hidden()


# --- the HTTP interface ---


def request(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """POST ``body`` (or GET without one) and return the status and the decoded JSON body."""
    sent = urllib.request.Request(url, data=body, headers=headers or {})
    if body is not None:
        sent.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(sent, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("api/sign-in", b"{not json", 400, "invalid_json"),
        ("api/sign-in", b"[1, 2]", 400, "invalid_json"),
        ("api/sign-in", b'{"pin": "1234"}', 400, "guard_id_invalid"),
        ("api/sign-in", b'{"guard_id": "g1", "pin": "12ab"}', 400, "pin_invalid"),
        ("api/id-check", b"{}", 400, "id_number_malformed"),
        ("api/id-check", b'{"id_number": 110101199003077}', 400, "id_number_malformed"),
        ("api/override", b'{"decision": "admit", "reason": "x"}', 400, "verdict_seq_invalid"),
        ("api/override", b'{"verdict_seq": true}', 400, "verdict_seq_invalid"),
        ("api/override", b'{"verdict_seq": 1, "decision": "maybe"}', 400, "unknown_decision"),
        (
            "api/override",
            b'{"verdict_seq": 1, "decision": "admit", "reason": "bribe"}',
            400,
            "unknown_reason",
        ),
        ("api/nothing", b"{}", 404, "not_found"),
        ("api/sign-in", b"{" + b" " * 20_000 + b"}", 413, "too_large"),
    ],
    ids=[
        "bad-json",
        "not-an-object",
        "missing-guard-id",
        "pin-not-digits",
        "missing-id-number",
        "id-number-not-text",
        "missing-verdict-seq",
        "verdict-seq-boolean",
        "unknown-decision",
        "unknown-reason",
        "unknown-path",
        "body-too-large",
    ],
)
def test_bad_request_gets_error_code(
    path: str,
    body: bytes,
    status: int,
    error: str,
    site: Site,
    gate_factory: list[ScreenGate],
) -> None:
    gate, _ = start_gate(site)
    gate_factory.append(gate)
    got_status, got_body = request(gate.url + path, body)
    assert got_status == status
    assert got_body["error"] == error
    assert got_body["message"]


def test_other_origin_is_rejected(site: Site, gate_factory: list[ScreenGate]) -> None:
    gate, _ = start_gate(site)
    gate_factory.append(gate)
    status, body = request(
        gate.url + "api/sign-out", b"{}", headers={"Origin": "http://example.com"}
    )
    assert status == 403
    assert body["error"] == "origin_mismatch"


def test_token_is_needed_when_configured(site: Site, gate_factory: list[ScreenGate]) -> None:
    gate, _ = start_gate(site, screen={"token": "s3cret-screen-token-0001"})
    gate_factory.append(gate)
    status, body = request(gate.url + "api/sign-out", b"{}")
    assert status == 401
    assert body["error"] == "unauthorised"


def test_token_in_address_becomes_cookie(
    site: Site, page: Page, gate_factory: list[ScreenGate]
) -> None:
    token = "s3cret-screen-token-0001"
    gate, source = start_gate(site, screen={"token": token})
    gate_factory.append(gate)
    page.goto(f"{gate.url}?token={token}")
    expect(page).to_have_url(gate.url)
    source.push(*site.pair("alice"))
    expect_verdict(page, "admit", "通行")


def test_id_number_is_never_logged(site: Site, gate_factory: list[ScreenGate]) -> None:
    key = new_id_lookup_key()
    key_file = site.folder / "id-lookup.key"
    write_id_lookup_key(key_file, key)
    with structlog.testing.capture_logs() as events:
        gate, _ = start_gate(
            site,
            scenario=with_id_number(site, "alice", ID_NUMBER, key),
            guard={"id_lookup_key_file": str(key_file)},
        )
        gate_factory.append(gate)
        status, body = request(
            gate.url + "api/id-check", json.dumps({"id_number": ID_NUMBER}).encode()
        )
        gate.stop()
    gate_factory.remove(gate)
    # The check ran all the way to a recorded verdict, so every log line on the path is seen.
    assert status == 200
    assert body["name"] == "张*丰"
    assert "screen_id_checked" in [event["event"] for event in events]
    assert ID_NUMBER not in repr(events)
    assert ID_NUMBER[:17] not in repr(events)


# --- configuration and `edgenode run` ---


def test_lan_address_without_token_is_invalid(site: Site) -> None:
    with pytest.raises(ConfigError) as caught:
        site_config(site, screen={"host": "0.0.0.0"})
    assert [issue.key_path for issue in caught.value.issues] == ["screen"]


def test_lan_address_with_token_is_valid(site: Site) -> None:
    config = site_config(site, screen={"host": "0.0.0.0", "token": "s3cret-screen-token-0001"})
    assert config.screen.host == "0.0.0.0"


def test_run_command_serves_screen(site: Site) -> None:
    build_cache(site, Scenario([]), site_config(site))
    master, slave = os.openpty()
    port = free_port()
    config = write_config(site, os.ttyname(slave))
    with config.open("a", encoding="utf-8") as extra:
        extra.write(f"\n[screen]\nenabled = true\nport = {port}\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "edgenode.cli", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Playwright's sync API keeps an event loop in this thread, so asyncio.run needs another.
        with ThreadPoolExecutor(max_workers=1) as worker:
            reading = worker.submit(asyncio.run, read_until_verdict(port, master, site))
            messages = reading.result(timeout=2 * EXPECT_TIMEOUT_MS / 1000)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=EXPECT_TIMEOUT_MS / 1000)
        os.close(master)
        os.close(slave)
    assert messages[0]["type"] == "hello"
    assert messages[-1]["word"] == "通行"


async def read_until_verdict(port: int, master: int, site: Site) -> list[dict[str, Any]]:
    """Connect to the screen's WebSocket, scan a pair on the pty and collect the messages."""
    deadline = time.monotonic() + EXPECT_TIMEOUT_MS / 1000
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                socket = await session.ws_connect(f"http://127.0.0.1:{port}/ws")
                break
            except aiohttp.ClientConnectionError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        async with socket:
            for code in site.pair():
                os.write(master, code.encode() + b"\r")
            messages: list[dict[str, Any]] = []
            while not messages or messages[-1]["type"] != "verdict":
                remaining = deadline - time.monotonic()
                messages.append(await socket.receive_json(timeout=max(remaining, 0.1)))
            return messages
