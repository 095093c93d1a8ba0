"""Door relay, LEDs and buzzer: pulses on admit, never by themselves, safe after stop and errors.

The pins are gpiozero's own mock pins (MockFactory), the only GPIO that runs off a Raspberry
Pi. Verdicts are real journal records; the daemon test runs the real pipeline.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from gpiozero.pins.mock import MockFactory, MockPin

from drivers.gpio import DoorOutputs, GpioError
from edgenode.config import ConfigError, DoorConfig, parse_config
from edgenode.daemon import Daemon
from edgenode.guard_desk import OverrideDecision, OverrideEvent
from edgenode.journal import Journal
from edgenode.pipeline import VerdictEvent
from edgenode.policy import Outcome, Verdict
from edgenode.reasons import Reason
from tests.scenarios import DirectMinter, Scenario, Site, build_cache, site_config
from tests.test_daemon import ScriptedSource, scan
from tests.test_run_command import wait_for as wait_until
from tests.test_run_command import write_config

RELAY, GREEN, RED, BUZZER = 17, 27, 22, 23
TIMEOUT_S = 10

REASONS = {
    Outcome.ADMIT: (Reason.HEALTH_GREEN,),
    Outcome.REVIEW: (Reason.HEALTH_YELLOW,),
    Outcome.DENY: (Reason.HEALTH_RED,),
    Outcome.INCOMPLETE: (Reason.MISSING_HEALTH_CODE,),
    Outcome.UNRECOGNISED: (Reason.UNRECOGNISED_PAYLOAD,),
}


class FailingPin(MockPin):
    """A mock pin whose writes fail once its name is in ``failing``, like a pin on a dead
    driver board."""

    failing: ClassVar[set[str]] = set()

    def _set_state(self, value: Any) -> None:
        if self.info.name in self.failing:
            raise OSError("GPIO write failed")
        super()._set_state(value)


@pytest.fixture
def failing_factory() -> Iterator[MockFactory]:
    factory = MockFactory(pin_class=FailingPin)
    yield factory
    FailingPin.failing.clear()
    factory.close()


@pytest.fixture
def factory() -> Iterator[MockFactory]:
    factory = MockFactory()
    yield factory
    factory.close()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    with Journal(tmp_path / "journal.db", "gate-test") as journal:
        yield journal


def door_config(**overrides: Any) -> DoorConfig:
    values: dict[str, Any] = {
        "enabled": True,
        "relay_pin": RELAY,
        "green_led_pin": GREEN,
        "red_led_pin": RED,
        "buzzer_pin": BUZZER,
        "pulse_ms": 200,
        "light_ms": 100,
        "beep_ms": 20,
    }
    return DoorConfig(**{**values, **overrides})


def verdict_event(journal: Journal, outcome: Outcome) -> VerdictEvent:
    verdict = Verdict(outcome=outcome, reasons=REASONS[outcome])
    record = journal.append_verdict(
        verdict, station="north", recorded_at=time.time(), latency_ms=1.0
    )
    return VerdictEvent(record, verdict, "north", 0.0)


def override_event(journal: Journal, decision: OverrideDecision) -> OverrideEvent:
    denied = verdict_event(journal, Outcome.DENY)
    return OverrideEvent(denied.record, denied.record.seq, decision, "id_document_checked", "g1")


def wait_for(condition: Callable[[], bool]) -> None:
    """Poll until the condition holds, failing after TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def levels(factory: MockFactory, number: int) -> list[bool]:
    """Every level the pin was driven to, in order, after the one it had when opened."""
    return [state.state for state in factory.pin(number).states[1:]]


def is_idle(factory: MockFactory, active_high: bool = True) -> Callable[[], bool]:
    """True once the relay is back at its inactive level and the buzzer and LEDs are off."""

    def idle() -> bool:
        relay = factory.pin(RELAY).state == (not active_high)
        others = not any(factory.pin(n).state for n in (GREEN, RED, BUZZER))
        return relay and others

    return idle


def opened(factory: MockFactory, **overrides: Any) -> DoorOutputs:
    outputs = DoorOutputs(door_config(**overrides), pin_factory=factory)
    outputs.open()
    return outputs


@pytest.mark.parametrize("active_high", [True, False], ids=["active-high", "active-low"])
def test_relay_never_pulses_at_start(factory: MockFactory, active_high: bool) -> None:
    outputs = opened(factory, relay_active_high=active_high)
    relay = factory.pin(RELAY)
    assert relay.function == "output"
    assert relay.state == (not active_high)
    assert active_high not in levels(factory, RELAY)
    outputs.close()


@pytest.mark.parametrize("active_high", [True, False], ids=["active-high", "active-low"])
def test_admit_pulses_relay_once_for_pulse_length(
    factory: MockFactory, journal: Journal, active_high: bool
) -> None:
    outputs = opened(factory, relay_active_high=active_high)
    factory.pin(RELAY).clear_states()

    outputs.on_verdict(verdict_event(journal, Outcome.ADMIT))
    wait_for(is_idle(factory, active_high))

    states = factory.pin(RELAY).states
    assert [state.state for state in states[1:]] == [active_high, not active_high]
    # A PinState's timestamp is the time since the previous change: here, how long the relay
    # was energised. gpiozero waits on an Event for the pulse, which never returns early.
    assert states[2].timestamp >= 0.2
    assert outputs.pulses == 1
    outputs.close()


def test_admit_lights_green_and_stays_silent(factory: MockFactory, journal: Journal) -> None:
    outputs = opened(factory)
    outputs.on_verdict(verdict_event(journal, Outcome.ADMIT))
    wait_for(is_idle(factory))
    assert levels(factory, GREEN) == [True, False]
    assert levels(factory, RED) == []
    assert levels(factory, BUZZER) == []
    outputs.close()


@pytest.mark.parametrize(
    "outcome", [Outcome.REVIEW, Outcome.DENY, Outcome.INCOMPLETE, Outcome.UNRECOGNISED]
)
def test_no_pulse_without_admit(factory: MockFactory, journal: Journal, outcome: Outcome) -> None:
    outputs = opened(factory)
    outputs.on_verdict(verdict_event(journal, outcome))
    wait_for(is_idle(factory))
    assert levels(factory, RELAY) == []
    assert outputs.pulses == 0
    outputs.close()


def test_deny_lights_red_and_beeps_three_times(factory: MockFactory, journal: Journal) -> None:
    outputs = opened(factory)
    outputs.on_verdict(verdict_event(journal, Outcome.DENY))
    wait_for(is_idle(factory))
    assert levels(factory, RED) == [True, False]
    assert levels(factory, BUZZER) == [True, False] * 3
    outputs.close()


def test_admitting_override_pulses_relay(factory: MockFactory, journal: Journal) -> None:
    outputs = opened(factory)
    outputs.on_override(override_event(journal, "admit"))
    wait_for(is_idle(factory))
    assert levels(factory, RELAY) == [True, False]
    assert levels(factory, GREEN) == [True, False]
    outputs.close()


def test_refusing_override_keeps_door_locked(factory: MockFactory, journal: Journal) -> None:
    outputs = opened(factory)
    outputs.on_override(override_event(journal, "refuse"))
    wait_for(is_idle(factory))
    assert levels(factory, RELAY) == []
    assert levels(factory, RED) == [True, False]
    outputs.close()


@pytest.mark.parametrize("active_high", [True, False], ids=["active-high", "active-low"])
def test_stop_during_pulse_leaves_relay_inactive(
    factory: MockFactory, journal: Journal, active_high: bool
) -> None:
    outputs = opened(factory, relay_active_high=active_high, pulse_ms=30_000)
    outputs.on_verdict(verdict_event(journal, Outcome.ADMIT))
    wait_for(lambda: factory.pin(RELAY).state == active_high)

    outputs.close()

    assert levels(factory, RELAY)[-1] == (not active_high)
    assert factory.pin(RELAY).state == (not active_high)
    assert factory.pin(RELAY).function == "input"


def test_output_error_during_admit_leaves_relay_inactive(
    failing_factory: MockFactory, journal: Journal
) -> None:
    outputs = opened(failing_factory, pulse_ms=30_000)
    FailingPin.failing.add(f"GPIO{RED}")

    with pytest.raises(OSError, match="GPIO write failed"):
        outputs.on_verdict(verdict_event(journal, Outcome.ADMIT))

    assert failing_factory.pin(RELAY).state is False
    FailingPin.failing.clear()
    outputs.close()


def test_output_error_during_override_leaves_relay_inactive(
    failing_factory: MockFactory, journal: Journal
) -> None:
    outputs = opened(failing_factory, pulse_ms=30_000)
    FailingPin.failing.add(f"GPIO{RED}")

    with pytest.raises(OSError, match="GPIO write failed"):
        outputs.on_override(override_event(journal, "admit"))

    assert failing_factory.pin(RELAY).state is False
    FailingPin.failing.clear()
    outputs.close()


def test_pin_in_use_is_a_gpio_error(factory: MockFactory) -> None:
    first = opened(factory)
    second = DoorOutputs(door_config(), pin_factory=factory)
    with pytest.raises(GpioError, match="cannot open the \\[door\\] GPIO pins"):
        second.open()
    assert factory.pin(RELAY).state is False
    first.close()


def test_unset_pins_are_not_driven(factory: MockFactory, journal: Journal) -> None:
    outputs = opened(factory, green_led_pin=None, red_led_pin=None, buzzer_pin=None)
    outputs.on_verdict(verdict_event(journal, Outcome.DENY))
    outputs.on_verdict(verdict_event(journal, Outcome.ADMIT))
    wait_for(is_idle(factory))
    assert levels(factory, GREEN) == []
    assert levels(factory, RELAY) == [True, False]
    outputs.close()


def test_daemon_admit_pulses_relay_and_deny_does_not(tmp_path: Path, factory: MockFactory) -> None:
    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    config = site_config(site)
    build_cache(site, Scenario([]), config)
    outputs = opened(factory)
    verdicts: list[VerdictEvent] = []
    source = ScriptedSource(
        "scanner",
        [scan("scanner", *site.pair("alice", colour="red")), scan("scanner", *site.pair("bob"))],
    )
    daemon = Daemon(config, [source], listeners=[outputs.on_verdict, verdicts.append])

    async def run() -> None:
        task = asyncio.create_task(daemon.run())
        deadline = time.monotonic() + TIMEOUT_S
        while len(verdicts) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        daemon.stop()
        await asyncio.wait_for(task, TIMEOUT_S)

    asyncio.run(run())
    wait_for(is_idle(factory))
    outputs.close()

    assert [event.verdict.outcome for event in verdicts] == [Outcome.DENY, Outcome.ADMIT]
    assert levels(factory, RELAY) == [True, False]


# --- `edgenode run` as a real process ---

DOOR_SECTIONS = """
[voice]
device = "null"

[door]
enabled = true
relay_pin = 17
green_led_pin = 27
pulse_ms = 200
"""


def test_run_command_wires_door_and_voice(tmp_path: Path) -> None:
    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    build_cache(site, Scenario([]), site_config(site))
    master, slave = os.openpty()
    config = write_config(site, os.ttyname(slave))
    config.write_text(config.read_text() + DOOR_SECTIONS)
    log_path = tmp_path / "daemon.log"
    environment = {**os.environ, "GPIOZERO_PIN_FACTORY": "mock"}
    command = [sys.executable, "-m", "edgenode.cli", "run", "--config", str(config)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    try:
        wait_until(lambda: b"source_connected" in log_path.read_bytes(), "the scanner to open")
        for payload in site.pair():
            os.write(master, payload.encode() + b"\r")
        wait_until(lambda: b"door_released" in log_path.read_bytes(), "the door pulse")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=TIMEOUT_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=TIMEOUT_S)
        os.close(master)
        os.close(slave)

    events = [json.loads(line)["event"] for line in log_path.read_text().splitlines()]
    assert "door_outputs_opened" in events
    assert "voice_started" in events
    assert "door_outputs_closed" in events
    assert "voice_playback_failed" not in events


def test_run_command_without_gpio_fails_at_start(tmp_path: Path) -> None:
    site = Site.create(tmp_path, int(time.time()), DirectMinter())
    config = write_config(site, "/dev/null")
    config.write_text(config.read_text() + DOOR_SECTIONS)
    environment = {k: v for k, v in os.environ.items() if k != "GPIOZERO_PIN_FACTORY"}
    result = subprocess.run(
        [sys.executable, "-m", "edgenode.cli", "--lang", "en", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S * 3,
        check=False,
        env=environment,
    )
    assert result.returncode == 3
    assert "cannot open the [door] GPIO pins" in result.stderr


@pytest.mark.parametrize(
    ("door", "message"),
    [
        ({"enabled": True, "relay_pin": 17, "buzzer_pin": 17}, "used twice: \\[17\\]"),
        ({"enabled": True}, "enabled without any pin"),
        ({"relay_pin": 28}, "less than or equal to 27"),
        ({"pulse_ms": 50}, "greater than or equal to 100"),
    ],
    ids=["shared-pin", "no-pins", "pin-off-header", "pulse-too-short"],
)
def test_door_config_rejects(door: dict[str, Any], message: str) -> None:
    data = {"device": {"id": "gate-01", "site": "XH-0012"}, "door": door}
    with pytest.raises(ConfigError, match=message):
        parse_config(data)
