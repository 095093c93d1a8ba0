"""Door relay, green and red LEDs and a buzzer on GPIO pins, driven through gpiozero.

An admit verdict, or a guard's admitting override, pulses the door relay for ``pulse_ms`` and
lights the green LED. Review and deny light the red LED and beep; an unreadable or incomplete
scan only beeps. The listeners start gpiozero's background blink threads and return, so the
pipeline thread never waits for a pulse to end.

The relay's safe state is "not energised": the door strike stays locked (fail-secure). The
code keeps it there in these cases:

- at start the relay pin is opened as an output at its inactive level (``initial_value=False``),
  so opening it never pulses the relay;
- at stop ``close()`` drives it inactive before releasing the pin;
- when a listener raises, the relay is driven inactive before the exception goes on.

When the process dies without running ``close()`` (SIGKILL, a power cut of the board alone),
the pin is outside this code's control. The installation guide (docs/hardware.md) therefore
asks for wiring where an undriven pin leaves the relay off: an active-high relay input with a
pull-down. The next start drives the pin inactive again.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import structlog
from gpiozero import LED, Buzzer, DigitalOutputDevice, GPIOZeroError
from gpiozero.pins import Factory

from edgenode.config import DoorConfig
from edgenode.policy import Outcome

if TYPE_CHECKING:
    from edgenode.guard_desk import OverrideEvent
    from edgenode.pipeline import VerdictEvent

log = structlog.get_logger("drivers.gpio")

# Buzzer beeps per kind of verdict; a verdict without an entry is silent.
BEEPS: dict[Outcome, int] = {
    Outcome.REVIEW: 1,
    Outcome.DENY: 3,
    Outcome.INCOMPLETE: 1,
    Outcome.UNRECOGNISED: 1,
}


class GpioError(Exception):
    """A GPIO pin that cannot be opened: no pin factory on this machine, or a pin in use."""


class DoorOutputs:
    """The gate's door relay, LEDs and buzzer. Pins left unset in ``[door]`` are not driven.

    ``pin_factory`` is gpiozero's pin factory; None picks the board's own (lgpio on a
    Raspberry Pi), and tests pass ``gpiozero.pins.mock.MockFactory``.
    """

    def __init__(self, config: DoorConfig, *, pin_factory: Factory | None = None) -> None:
        self.config = config
        self.pin_factory = pin_factory
        self.pulses = 0
        self._lock = threading.Lock()
        self._relay: DigitalOutputDevice | None = None
        self._green: LED | None = None
        self._red: LED | None = None
        self._buzzer: Buzzer | None = None

    # --- life cycle ---

    def open(self) -> None:
        """Claim the configured pins, each at its inactive level. Raises GpioError."""
        config = self.config
        try:
            if config.relay_pin is not None:
                # initial_value=False sets the inactive level in the same call that makes the
                # pin an output, so opening the pin never drives the relay active.
                self._relay = DigitalOutputDevice(
                    config.relay_pin,
                    active_high=config.relay_active_high,
                    initial_value=False,
                    pin_factory=self.pin_factory,
                )
            if config.green_led_pin is not None:
                self._green = LED(config.green_led_pin, pin_factory=self.pin_factory)
            if config.red_led_pin is not None:
                self._red = LED(config.red_led_pin, pin_factory=self.pin_factory)
            if config.buzzer_pin is not None:
                self._buzzer = Buzzer(config.buzzer_pin, pin_factory=self.pin_factory)
        except GPIOZeroError as exc:
            self.close()
            raise GpioError(
                f"cannot open the [door] GPIO pins ({exc}): on a Raspberry Pi, check that "
                "no other program uses them; elsewhere, set [door] enabled = false"
            ) from exc
        log.info(
            "door_outputs_opened",
            relay_pin=config.relay_pin,
            relay_active_high=config.relay_active_high,
            green_led_pin=config.green_led_pin,
            red_led_pin=config.red_led_pin,
            buzzer_pin=config.buzzer_pin,
        )

    def close(self) -> None:
        """Drive the relay inactive, switch everything off and release the pins."""
        with self._lock:
            self._make_safe()
            for device in (self._relay, self._green, self._red, self._buzzer):
                if device is not None:
                    device.close()
            self._relay = self._green = self._red = self._buzzer = None
        log.info("door_outputs_closed", pulses=self.pulses)

    # --- listeners (called on the pipeline thread; gpiozero's threads do the timing) ---

    def on_verdict(self, event: VerdictEvent) -> None:
        outcome = event.verdict.outcome
        with self._lock, self._safe_on_error():
            if outcome == Outcome.ADMIT:
                self._admit(event.record.seq)
            elif outcome in (Outcome.REVIEW, Outcome.DENY):
                self._light(self._red, self._green)
            self._beep(BEEPS.get(outcome, 0))

    def on_override(self, event: OverrideEvent) -> None:
        with self._lock, self._safe_on_error():
            if event.decision == "admit":
                self._admit(event.verdict_seq)
            else:
                self._light(self._red, self._green)

    # --- steps ---

    def _admit(self, seq: int) -> None:
        if self._relay is not None:
            # One cycle of gpiozero's blink: on for the pulse, then off, in its own thread.
            self._relay.blink(on_time=self.config.pulse_ms / 1000, off_time=0, n=1)
            self.pulses += 1
            log.info("door_released", seq=seq, pulse_ms=self.config.pulse_ms)
        self._light(self._green, self._red)

    def _light(self, led: LED | None, other: LED | None) -> None:
        if other is not None:
            other.off()
        if led is not None:
            led.blink(on_time=self.config.light_ms / 1000, off_time=0, n=1)

    def _beep(self, count: int) -> None:
        if self._buzzer is not None and count:
            beep_s = self.config.beep_ms / 1000
            self._buzzer.beep(on_time=beep_s, off_time=beep_s, n=count)

    @contextlib.contextmanager
    def _safe_on_error(self) -> Iterator[None]:
        """Make the outputs safe when the block raises, then let the exception go on."""
        try:
            yield
        except BaseException:
            self._make_safe()
            raise

    def _make_safe(self) -> None:
        """Drive the relay inactive and switch off the lights and the buzzer."""
        for device in (self._relay, self._green, self._red, self._buzzer):
            if device is None:
                continue
            try:
                device.off()
            except (GPIOZeroError, OSError) as exc:
                log.error("door_output_off_failed", device=repr(device), error=repr(exc))
