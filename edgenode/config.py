"""Typed TOML configuration, validated at load.

Unknown keys and out-of-range values are errors that name their key path, so an installer
can fix a file in the field from `edgenode config check` alone.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from edgenode.codes import TokenPattern

Action = Literal["admit", "review", "deny"]
Language = Literal["zh_CN", "en"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceConfig(_Strict):
    id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")] = Field(
        description="Device id, unique in the district."
    )
    site: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[\x21-\x7e]+$")] = Field(
        description="Compound id; community codes for other compounds are not admitted."
    )
    station: Annotated[str, Field(min_length=1, max_length=64)] = Field(
        default="gate", description="Name of this gate's scanning station."
    )
    state_dir: Path = Field(
        default=Path("/var/lib/edgenode"),
        description="Folder for the cache and journal databases. Relative paths are resolved "
        "against the config file's folder.",
    )


class TrustConfig(_Strict):
    district_keys: list[str] = Field(
        default_factory=list,
        description="Base64 Ed25519 public keys that may sign cache snapshots.",
    )

    @field_validator("district_keys")
    @classmethod
    def _check_keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            try:
                raw = base64.b64decode(key, validate=True)
            except binascii.Error as exc:
                raise ValueError(f"not valid base64: {key!r}") from exc
            if len(raw) != 32:
                raise ValueError(f"an Ed25519 public key has 32 bytes, this one has {len(raw)}")
        return keys

    def district_key_bytes(self) -> list[bytes]:
        return [base64.b64decode(key) for key in self.district_keys]


class DecoderConfig(_Strict):
    backend: Literal["zxing", "pyzbar"] = Field(default="zxing", description="QR decoder backend.")


class PairingConfig(_Strict):
    pair_window_ms: Annotated[int, Field(ge=500, le=120_000)] = Field(
        default=8_000,
        description="How long a lone code waits for its partner before the pair is incomplete.",
    )
    debounce_ms: Annotated[int, Field(ge=0, le=60_000)] = Field(
        default=2_000,
        description="The same code seen again at a station within this time counts once.",
    )


class TokenPatternConfig(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    regex: str = Field(description="Python regular expression with a named group 'token'.")

    @field_validator("regex")
    @classmethod
    def _check_regex(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from exc
        if "token" not in compiled.groupindex:
            raise ValueError("the expression needs a named group: (?P<token>...)")
        return value


class PolicyConfig(_Strict):
    stale_after_s: Annotated[int, Field(ge=60, le=30 * 86_400)] = Field(
        default=86_400, description="Cache age after which verdicts are review, never admit."
    )
    dynamic_max_age_s: Annotated[int, Field(ge=10, le=3_600)] = Field(
        default=180,
        description="A dynamic code older than this is taken for a screenshot.",
    )
    replay_window_s: Annotated[int, Field(ge=0, le=86_400)] = Field(
        default=120, description="The same code used again at this gate within this time."
    )
    future_tolerance_s: Annotated[int, Field(ge=0, le=3_600)] = Field(
        default=300, description="How far in the future a code's issue time may lie."
    )
    yellow: Action = Field(default="review", description="Verdict for a yellow health status.")
    health_unknown: Action = Field(
        default="review", description="Verdict when no health status is known."
    )
    visitor: Action = Field(default="review", description="Verdict for the visitor role.")
    staff: Action = Field(default="admit", description="Verdict for the staff role.")
    delivery: Action = Field(default="review", description="Verdict for the delivery role.")
    token_patterns: list[TokenPatternConfig] = Field(
        default_factory=list,
        description="Patterns that recognise city-platform health-code tokens.",
    )

    @field_validator("yellow", "health_unknown")
    @classmethod
    def _never_admit(cls, value: Action) -> Action:
        if value == "admit":
            raise ValueError("must be 'review' or 'deny': admitting without green status is unsafe")
        return value

    def compiled_token_patterns(self) -> tuple[TokenPattern, ...]:
        return tuple(TokenPattern(p.name, re.compile(p.regex)) for p in self.token_patterns)


class CameraSourceConfig(_Strict):
    type: Literal["camera"]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    device: str = Field(
        default="",
        description="Stable device path such as /dev/v4l/by-id/usb-...-video-index0; "
        "empty to use `index`.",
    )
    index: Annotated[int, Field(ge=0, le=63)] = Field(
        default=0, description="V4L2 device index, used when `device` is empty."
    )
    backend: Literal["v4l2", "picamera2"] = Field(
        default="v4l2", description="picamera2 works only where that module is importable."
    )
    pixel_format: Annotated[str, Field(pattern=r"^[A-Z0-9]{4}$")] = Field(
        default="MJPG", description="FOURCC of the pixel format to request."
    )
    width: Annotated[int, Field(ge=160, le=4096)] = 1280
    height: Annotated[int, Field(ge=120, le=4096)] = 720
    fps: Annotated[int, Field(ge=1, le=120)] = 30
    roi: tuple[int, int, int, int] | None = Field(
        default=None, description="Region of interest as x, y, width, height in pixels."
    )
    reconnect_max_s: Annotated[float, Field(ge=1, le=300)] = Field(
        default=30.0, description="Upper bound of the reconnect backoff, in seconds."
    )


class HidSourceConfig(_Strict):
    type: Literal["hid"]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    vid_pid: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$")] | None = Field(
        default=None, description="USB vendor and product id, e.g. 0c2e:0b61."
    )
    device_name: str | None = Field(
        default=None, description="Input device name as the kernel reports it."
    )
    inter_key_timeout_ms: Annotated[int, Field(ge=20, le=2_000)] = Field(
        default=100, description="A gap this long between keys ends a code."
    )
    max_scan_ms: Annotated[int, Field(ge=100, le=30_000)] = Field(
        default=3_000, description="A code still being typed after this long is cut off."
    )
    grab: bool = Field(
        default=True, description="Grab the device so scans never type into the screen."
    )

    @field_validator("device_name")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be blank")
        return value

    @model_validator(mode="after")
    def _named_device(self) -> HidSourceConfig:
        if self.vid_pid is None and self.device_name is None:
            raise ValueError("set vid_pid or device_name: a scanner is never 'any keyboard'")
        return self


class SerialSourceConfig(_Strict):
    type: Literal["serial"]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    device: str = Field(description="Stable path such as /dev/serial/by-id/usb-...-if00.")
    baudrate: Annotated[int, Field(ge=1_200, le=921_600)] = 9_600
    suffix: Literal["cr", "lf", "crlf"] = Field(
        default="cr", description="Terminator the scanner sends after each code."
    )
    inter_byte_timeout_ms: Annotated[int, Field(ge=10, le=2_000)] = Field(
        default=100, description="Bytes that stop this long before a suffix are a cut-off code."
    )
    charset: str | None = Field(
        default=None, description="Charset of the scanner's output; default UTF-8, else GB18030."
    )


class VideoSourceConfig(_Strict):
    type: Literal["video"]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    path: Path = Field(description="Video file played at its own frame rate, for trials.")
    loop: bool = False


SourceConfig = Annotated[
    CameraSourceConfig | HidSourceConfig | SerialSourceConfig | VideoSourceConfig,
    Field(discriminator="type"),
]


class DisplayConfig(_Strict):
    language: Language | None = Field(
        default=None,
        description="Language of messages for people; unset means $EDGENODE_LANG, else zh_CN.",
    )


class TlsConfig(_Strict):
    ca_file: Path | None = Field(
        default=None, description="CA certificate file; the system's CAs when unset."
    )
    cert_file: Path | None = Field(default=None, description="Client certificate file.")
    key_file: Path | None = Field(default=None, description="Client certificate's key file.")

    @model_validator(mode="after")
    def _key_needs_certificate(self) -> TlsConfig:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set without cert_file: set both, or neither")
        return self


class SyncConfig(_Strict):
    enabled: bool = Field(default=False, description="Sync with the district over MQTT.")
    broker_host: str = Field(default="localhost", description="MQTT broker host name.")
    broker_port: Annotated[int, Field(ge=1, le=65_535)] = 8883
    tls: TlsConfig | None = Field(
        default=None, description="TLS settings; plain TCP when unset (for tests only)."
    )
    username: str | None = None
    password_file: Path | None = Field(
        default=None, description="File holding the broker password, readable by the owner."
    )
    keepalive_s: Annotated[int, Field(ge=5, le=1_200)] = Field(
        default=30, description="MQTT keepalive; a silent broker is detected within 1.5x."
    )
    reconnect_max_s: Annotated[float, Field(ge=1, le=600)] = Field(
        default=60.0, description="Upper bound of the reconnect backoff, in seconds."
    )
    batch_max_records: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=500, description="Records per uplink batch."
    )
    drain_records_per_s: Annotated[float, Field(ge=1, le=1_000_000)] = Field(
        default=2_000.0, description="Rate limit when draining a backlog, in records per second."
    )
    ack_timeout_s: Annotated[float, Field(ge=1, le=3_600)] = Field(
        default=30.0, description="A batch without the district's ack is sent again after this."
    )
    outbox_alarm_records: Annotated[int, Field(ge=100, le=100_000_000)] = Field(
        default=1_000_000, description="Unsent records beyond this raise the outbox_full alarm."
    )
    clock_skew_alarm_s: Annotated[float, Field(ge=1, le=86_400)] = Field(
        default=120.0, description="District time further off than this raises an alarm."
    )


class ClockConfig(_Strict):
    ntp_source: Literal["auto", "kernel", "timedatectl", "rtc"] = Field(
        default="auto",
        description="What vouches for the system clock: 'kernel' reads the kernel's NTP state "
        "(adjtimex), 'timedatectl' asks systemd-timesyncd, 'auto' tries 'kernel' and then "
        "'timedatectl', 'rtc' trusts a battery-backed clock fitted by the installer. The "
        "district's time in sync messages vouches as well.",
    )


class JournalConfig(_Strict):
    retention_days: Annotated[int, Field(ge=1, le=3_650)] = Field(
        default=30,
        description="Verdict records acked by the district are purged after this many days.",
    )
    purge_interval_s: Annotated[int, Field(ge=60, le=86_400)] = Field(
        default=3_600, description="How often the daemon purges expired records, in seconds."
    )


class ScreenConfig(_Strict):
    enabled: bool = Field(
        default=False, description="Serve the guard's screen while `edgenode run` runs."
    )
    host: str = Field(
        default="127.0.0.1",
        description="Address the screen listens on; an address off this machine needs `token`.",
    )
    port: Annotated[int, Field(ge=1, le=65_535)] = Field(
        default=8080, description="TCP port of the screen."
    )
    token: (
        Annotated[str, Field(min_length=16, max_length=256, pattern=r"^[\x21-\x7e]+$")] | None
    ) = Field(
        default=None,
        description="Secret the browser presents once as /?token=...; needed off loopback.",
    )
    clear_after_s: Annotated[float, Field(ge=1, le=120)] = Field(
        default=6.0, description="Seconds a verdict stays on the screen."
    )

    @model_validator(mode="after")
    def _token_off_loopback(self) -> ScreenConfig:
        if self.token is None and not _is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is reachable from other machines: set token, "
                "or listen on 127.0.0.1"
            )
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class VoiceConfig(_Strict):
    enabled: bool = Field(default=True, description="Speak a short prompt for every verdict.")
    volume_percent: Annotated[int, Field(ge=0, le=100)] = Field(
        default=80, description="Prompt volume, in percent of the recorded level."
    )
    device: str = Field(
        default="",
        description="ALSA output device, as `aplay -L` lists it; empty for the default device.",
    )


# BCM (Broadcom) GPIO numbers of the 40-pin header, the numbering gpiozero uses for integers.
GpioPin = Annotated[int, Field(ge=0, le=27)]


class DoorConfig(_Strict):
    enabled: bool = Field(
        default=False, description="Drive the door relay, LEDs and buzzer through GPIO."
    )
    relay_pin: GpioPin | None = Field(
        default=None, description="BCM number of the pin that drives the door relay."
    )
    relay_active_high: bool = Field(
        default=True,
        description="True when a high level energises the relay (releases the door).",
    )
    pulse_ms: Annotated[int, Field(ge=100, le=30_000)] = Field(
        default=1_000, description="How long the relay releases the door on admit."
    )
    green_led_pin: GpioPin | None = Field(default=None, description="BCM number of the green LED.")
    red_led_pin: GpioPin | None = Field(default=None, description="BCM number of the red LED.")
    buzzer_pin: GpioPin | None = Field(
        default=None, description="BCM number of an active buzzer (one that beeps on DC)."
    )
    light_ms: Annotated[int, Field(ge=100, le=30_000)] = Field(
        default=2_000, description="How long an LED stays lit after a verdict."
    )
    beep_ms: Annotated[int, Field(ge=20, le=5_000)] = Field(
        default=300, description="Length of one buzzer beep."
    )

    @model_validator(mode="after")
    def _distinct_pins(self) -> DoorConfig:
        pins = [
            pin
            for pin in (self.relay_pin, self.green_led_pin, self.red_led_pin, self.buzzer_pin)
            if pin is not None
        ]
        duplicates = sorted({pin for pin in pins if pins.count(pin) > 1})
        if duplicates:
            raise ValueError(f"each output needs its own pin; used twice: {duplicates}")
        if self.enabled and not pins:
            raise ValueError("enabled without any pin: set relay_pin, an LED pin or buzzer_pin")
        return self


class GuardConfig(_Strict):
    shift_max_s: Annotated[int, Field(ge=600, le=86_400)] = Field(
        default=43_200,
        description="A guard's shift ends this long after sign-in unless signed out before, "
        "in seconds.",
    )
    pin_attempts_max: Annotated[int, Field(ge=3, le=20)] = Field(
        default=5, description="Wrong PINs in a row for one guard id before its sign-in locks."
    )
    lockout_s: Annotated[int, Field(ge=30, le=3_600)] = Field(
        default=300, description="How long a locked guard id cannot sign in, in seconds."
    )
    id_lookup_key_file: Path | None = Field(
        default=None,
        description="File with the district's ID lookup key (one base64 line, owner-only), "
        "for checks by ID number. Unset disables them. A relative path is taken from the "
        "config file's folder.",
    )


class MetricsConfig(_Strict):
    enabled: bool = Field(
        default=False, description="Serve Prometheus metrics over HTTP while `edgenode run` runs."
    )
    host: str = Field(
        default="127.0.0.1",
        description="Address the metrics endpoint listens on; loopback keeps it on this machine.",
    )
    port: Annotated[int, Field(ge=1, le=65_535)] = Field(
        default=9464, description="TCP port of the metrics endpoint (/metrics)."
    )


class Config(_Strict):
    device: DeviceConfig
    trust: TrustConfig = Field(default_factory=TrustConfig)
    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    pairing: PairingConfig = Field(default_factory=PairingConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    display: DisplayConfig = Field(default_factory=DisplayConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    clock: ClockConfig = Field(default_factory=ClockConfig)
    journal: JournalConfig = Field(default_factory=JournalConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    voice: VoiceConfig = Field(default_factory=VoiceConfig)
    door: DoorConfig = Field(default_factory=DoorConfig)
    screen: ScreenConfig = Field(default_factory=ScreenConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    sources: list[SourceConfig] = Field(
        default_factory=list, description="Input sources that `edgenode run` reads."
    )

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [source.name for source in sources]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"source names must be unique: {', '.join(duplicates)}")
        return sources

    @property
    def cache_path(self) -> Path:
        return self.device.state_dir / "cache.db"

    @property
    def guards_path(self) -> Path:
        return self.device.state_dir / "guards.json"

    @property
    def journal_path(self) -> Path:
        return self.device.state_dir / "journal.db"

    @property
    def device_key_path(self) -> Path:
        return self.device.state_dir / "device.key"


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file, at a dotted key path such as ``policy.stale_after_s``."""

    key_path: str
    message: str


class ConfigError(Exception):
    """A config file that cannot be used. ``issues`` lists every problem found."""

    def __init__(self, path: Path, issues: list[ConfigIssue]) -> None:
        self.path = path
        self.issues = issues
        lines = "; ".join(f"{issue.key_path}: {issue.message}" for issue in issues)
        super().__init__(f"invalid config {path}: {lines}")


def load_config(path: Path) -> Config:
    """Read and validate a TOML config file. Raises ConfigError listing every problem."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, [ConfigIssue("(file)", f"cannot read: {exc.strerror}")]) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [ConfigIssue("(file)", "not UTF-8 text")]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [ConfigIssue("(file)", f"invalid TOML: {exc}")]) from exc
    config = parse_config(data, path)
    state_dir = config.device.state_dir
    if not state_dir.is_absolute():
        device = config.device.model_copy(update={"state_dir": path.parent / state_dir})
        config = config.model_copy(update={"device": device})
    key_file = config.guard.id_lookup_key_file
    if key_file is not None and not key_file.is_absolute():
        guard = config.guard.model_copy(update={"id_lookup_key_file": path.parent / key_file})
        config = config.model_copy(update={"guard": guard})
    return config


def parse_config(data: dict[str, object], path: Path = Path("<config>")) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        issues = [
            ConfigIssue(
                ".".join(str(part) for part in error["loc"]) or "(root)",
                # pydantic's wording for this one ("Extra inputs are not permitted") hides the
                # usual cause, a misspelt key.
                "unknown key: check its spelling"
                if error["type"] == "extra_forbidden"
                else error["msg"],
            )
            for error in exc.errors()
        ]
        raise ConfigError(path, issues) from exc
