"""The systemd units, sysusers files and udev rules that scripts/install puts in place."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
GATE_UNIT = SYSTEMD / "edgenode.service"
HUB_UNIT = SYSTEMD / "edgenode-district.service"
UDEV_RULES = SYSTEMD / "70-edgenode.rules"
MAX_EXPOSURE = 2.0


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Parse a unit file into "Section.Key" -> every value given, in order."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def last(settings: dict[str, list[str]], key: str) -> str:
    return settings[key][-1]


def sysusers_lines(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.split() for line in lines if line.strip() and not line.startswith("#")]


# --- systemd-analyze security ---


def systemd_analyze() -> str:
    """Return the path of systemd-analyze. Skip the test without it, but fail in CI."""
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is missing in CI: scripts/setup installs systemd")
        pytest.skip("systemd-analyze is not installed")
    return path


@pytest.mark.parametrize("unit", [GATE_UNIT, HUB_UNIT], ids=lambda unit: unit.name)
def test_unit_exposure_is_at_most_two(unit: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)

    assert found is not None, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("unit", [GATE_UNIT, HUB_UNIT], ids=lambda unit: unit.name)
def test_unit_verifies_without_warnings(unit: Path, tmp_path: Path) -> None:
    # verify also checks that ExecStart exists, and /opt/edgenode is not installed here.
    program = "/opt/edgenode/current/bin/edgenode"
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text(encoding="utf-8").replace(program, "/bin/true"), "utf-8")

    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


# --- the gate's unit ---


def test_gate_unit_is_notify_with_watchdog() -> None:
    settings = unit_settings(GATE_UNIT)

    assert last(settings, "Service.Type") == "notify"
    assert last(settings, "Service.NotifyAccess") == "main"
    assert last(settings, "Service.WatchdogSec") == "30s"


def test_gate_unit_restart_is_limited() -> None:
    settings = unit_settings(GATE_UNIT)

    assert last(settings, "Service.Restart") == "on-failure"
    assert int(last(settings, "Unit.StartLimitBurst")) > 0
    assert int(last(settings, "Unit.StartLimitIntervalSec")) > 0


def test_gate_unit_user_and_groups() -> None:
    settings = unit_settings(GATE_UNIT)
    groups = " ".join(settings["Service.SupplementaryGroups"]).split()

    assert last(settings, "Service.User") == "edgenode"
    assert sorted(groups) == ["audio", "dialout", "gpio", "input", "video"]


def test_gate_unit_has_state_and_config_directories() -> None:
    settings = unit_settings(GATE_UNIT)

    assert last(settings, "Service.StateDirectory") == "edgenode"
    assert last(settings, "Service.ConfigurationDirectory") == "edgenode"
    assert "/etc/edgenode/edgenode.toml" in last(settings, "Service.ExecStart")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Service.ProtectSystem", "strict"),
        ("Service.NoNewPrivileges", "yes"),
        ("Service.PrivateTmp", "yes"),
        ("Service.CapabilityBoundingSet", ""),
        ("Service.AmbientCapabilities", ""),
        ("Service.DevicePolicy", "closed"),
    ],
)
def test_gate_unit_sandbox_setting(key: str, value: str) -> None:
    assert last(unit_settings(GATE_UNIT), key) == value


def test_gate_unit_allows_devices_by_class_only() -> None:
    allowed = unit_settings(GATE_UNIT)["Service.DeviceAllow"]
    classes = {entry.split()[0] for entry in allowed}

    assert all(name.startswith("char-") for name in classes)
    assert {"char-video4linux", "char-input", "char-ttyUSB", "char-ttyACM", "char-alsa"} <= classes


# --- the hub's unit ---


def test_hub_unit_runs_district_serve_without_devices() -> None:
    settings = unit_settings(HUB_UNIT)

    assert "district serve" in last(settings, "Service.ExecStart")
    assert last(settings, "Service.PrivateDevices") == "yes"
    assert "Service.DeviceAllow" not in settings
    assert last(settings, "Service.CapabilityBoundingSet") == ""


def test_hub_unit_restart_is_limited() -> None:
    settings = unit_settings(HUB_UNIT)

    assert last(settings, "Service.Restart") == "on-failure"
    assert int(last(settings, "Unit.StartLimitBurst")) > 0


# --- sysusers ---


@pytest.mark.parametrize(
    ("unit", "sysusers"),
    [
        (GATE_UNIT, SYSTEMD / "edgenode.sysusers.conf"),
        (HUB_UNIT, SYSTEMD / "edgenode-district.sysusers.conf"),
    ],
    ids=["gate", "hub"],
)
def test_sysusers_creates_the_unit_user(unit: Path, sysusers: Path) -> None:
    users = [fields[1] for fields in sysusers_lines(sysusers) if fields[0] == "u"]

    assert users == [last(unit_settings(unit), "Service.User")]


def test_sysusers_adds_the_user_to_every_device_group() -> None:
    lines = sysusers_lines(SYSTEMD / "edgenode.sysusers.conf")
    memberships = {fields[2] for fields in lines if fields[0] == "m" and fields[1] == "edgenode"}
    groups = set(" ".join(unit_settings(GATE_UNIT)["Service.SupplementaryGroups"]).split())

    assert memberships == groups


# --- udev rules ---

# udev rule keys (udev(7)): those that only match, and those that assign.
MATCH_KEYS = {"ACTION", "SUBSYSTEM", "SUBSYSTEMS", "KERNEL", "KERNELS", "ATTR", "ATTRS", "ENV"}
ASSIGN_KEYS = {"GROUP", "MODE", "SYMLINK", "GOTO", "LABEL", "ENV", "TAG", "OWNER"}
TOKEN = re.compile(r'\s*([A-Z_]+)(?:\{([^}]*)\})?\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*(,|$)')


def udev_rules(path: Path) -> list[list[tuple[str, str | None, str, str]]]:
    """Parse each rule line into (key, attribute, operator, value) tokens, or raise."""
    rules = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tokens, position = [], 0
        while position < len(line):
            token = TOKEN.match(line, position)
            if token is None:
                raise ValueError(f"{path.name}:{number}: cannot parse from column {position}")
            tokens.append((token[1], token[2], token[3], token[4]))
            position = token.end()
        rules.append(tokens)
    return rules


def rule_symlinks(device: dict[str, str], path: Path = UDEV_RULES) -> list[str]:
    """Evaluate the rules for one device event, the way udev does for these keys.

    ``device`` contains ACTION, SUBSYSTEM, KERNEL, "ATTRS{name}" and "ENV{name}" entries, and
    SUBSYSTEMS for the subsystem of a parent (udev walks every parent). Every match is a glob
    with "|" alternatives. Returns the links that SYMLINK+= would create.
    """
    env = {key[4:-1]: value for key, value in device.items() if key.startswith("ENV{")}
    links: list[str] = []
    skip_to: str | None = None
    for rule in udev_rules(path):
        if skip_to is not None:
            if any(key == "LABEL" and value == skip_to for key, _, _, value in rule):
                skip_to = None
            continue
        matched = True
        for key, attribute, operator, value in rule:
            if operator not in ("==", "!="):
                continue
            if key == "ENV":
                actual = env.get(attribute or "", "")
            elif key in ("ATTRS", "ATTR"):
                actual = device.get(f"ATTRS{{{attribute}}}", "")
            else:
                actual = device.get(key, "")
            hit = any(fnmatch.fnmatchcase(actual, glob) for glob in value.split("|"))
            if hit != (operator == "=="):
                matched = False
                break
        if not matched:
            continue
        for key, attribute, operator, value in rule:
            if key == "ENV" and operator == "=":
                env[attribute or ""] = value
            elif key == "SYMLINK":
                links.append(re.sub(r"\$env\{(\w+)\}", lambda m: env.get(m[1], ""), value))
            elif key == "GOTO":
                skip_to = value
    return links


def test_udev_rules_parse_with_known_keys() -> None:
    for rule in udev_rules(UDEV_RULES):
        for key, _, operator, _ in rule:
            keys = MATCH_KEYS if operator in ("==", "!=") else ASSIGN_KEYS
            assert key in keys, f"{key}{operator} in {rule}"


def test_udev_rules_give_only_edgenode_links() -> None:
    for rule in udev_rules(UDEV_RULES):
        for key, _, _, value in rule:
            if key == "SYMLINK":
                assert re.fullmatch(r"edgenode/(camera|scanner-hid|scanner-serial)-\S+", value)


def test_udev_rules_groups_match_the_unit() -> None:
    groups = set(" ".join(unit_settings(GATE_UNIT)["Service.SupplementaryGroups"]).split())
    assigned = {
        value for rule in udev_rules(UDEV_RULES) for key, _, _, value in rule if key == "GROUP"
    }

    assert assigned <= groups


def test_udevadm_verify_accepts_rules() -> None:
    udevadm = shutil.which("udevadm")
    if udevadm is None:
        pytest.skip("udevadm is not installed; the parser tests above cover the syntax")
    probe = subprocess.run([udevadm, "verify", "--help"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip("this udevadm has no verify command (it came in systemd 254)")
    result = subprocess.run(
        [udevadm, "verify", str(UDEV_RULES)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr


CAMERA = {
    "ACTION": "add",
    "SUBSYSTEM": "video4linux",
    "KERNEL": "video0",
    "ENV{ID_V4L_CAPABILITIES}": ":capture:",
    "ENV{ID_PATH_TAG}": "platform-xhci-hcd_0-usb-0_1_1_0",
}
CAMERA_METADATA_NODE = {**CAMERA, "KERNEL": "video1", "ENV{ID_V4L_CAPABILITIES}": ":"}
HID_SCANNER = {
    "ACTION": "add",
    "SUBSYSTEM": "input",
    "KERNEL": "event5",
    "SUBSYSTEMS": "usb",
    "ATTRS{idVendor}": "1eab",
    "ENV{ID_INPUT_KEYBOARD}": "1",
    "ENV{ID_PATH_TAG}": "platform-xhci-hcd_0-usb-0_1_2_1_0",
}
KEYBOARD = {**HID_SCANNER, "ATTRS{idVendor}": "046d"}
SERIAL_SCANNER = {
    "ACTION": "add",
    "SUBSYSTEM": "tty",
    "KERNEL": "ttyACM0",
    "SUBSYSTEMS": "usb",
    "ATTRS{idVendor}": "0c2e",
    "ENV{ID_PATH_TAG}": "platform-xhci-hcd_0-usb-0_1_3_1_0",
}


@pytest.mark.parametrize(
    ("device", "links"),
    [
        (CAMERA, ["edgenode/camera-platform-xhci-hcd_0-usb-0_1_1_0"]),
        (CAMERA_METADATA_NODE, []),
        (HID_SCANNER, ["edgenode/scanner-hid-platform-xhci-hcd_0-usb-0_1_2_1_0"]),
        (KEYBOARD, []),
        (SERIAL_SCANNER, ["edgenode/scanner-serial-platform-xhci-hcd_0-usb-0_1_3_1_0"]),
        ({**CAMERA, "ACTION": "remove"}, []),
    ],
    ids=["camera", "camera-metadata", "hid-scanner", "keyboard", "serial-scanner", "remove"],
)
def test_udev_rules_name_devices_stably(device: dict[str, str], links: list[str]) -> None:
    assert rule_symlinks(device) == links
