"""Find the cameras, input devices and serial ports attached to this machine.

Installers use this through ``edgenode devices`` to learn the stable paths to put in the
config: /dev/v4l/by-id/... for cameras, VID:PID or the device name for keyboard-wedge
scanners, /dev/serial/by-id/... for serial scanners.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SYSFS_VIDEO = Path("/sys/class/video4linux")
V4L_BY_ID = Path("/dev/v4l/by-id")
SERIAL_BY_ID = Path("/dev/serial/by-id")


@dataclass(frozen=True, slots=True)
class FoundDevice:
    kind: str  # "camera", "input" or "serial"
    path: str
    # The stable path to put in the config, where one exists.
    stable_path: str
    name: str
    vid_pid: str = ""
    note: str = ""


def _links_by_target(folder: Path) -> dict[str, str]:
    """Map each device node to the stable symlink in ``folder`` that points at it."""
    links: dict[str, str] = {}
    if not folder.is_dir():
        return links
    for link in sorted(folder.iterdir()):
        try:
            links.setdefault(os.path.realpath(link), str(link))
        except OSError:
            continue
    return links


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def find_cameras(sysfs: Path = SYSFS_VIDEO, by_id: Path = V4L_BY_ID) -> list[FoundDevice]:
    links = _links_by_target(by_id)
    found: list[FoundDevice] = []
    if not sysfs.is_dir():
        return found
    for entry in sorted(sysfs.iterdir()):
        node = f"/dev/{entry.name}"
        device = entry / "device"
        vendor = _read(device / ".." / "idVendor")
        product = _read(device / ".." / "idProduct")
        found.append(
            FoundDevice(
                kind="camera",
                path=node,
                stable_path=links.get(node, ""),
                name=_read(entry / "name"),
                vid_pid=f"{vendor}:{product}" if vendor and product else "",
                # A UVC camera exposes a capture node and a metadata node; index 0 captures.
                note=f"index {_read(entry / 'index') or '?'}",
            )
        )
    return found


def find_input_devices() -> list[FoundDevice]:
    """Keyboard-like input devices, which is how keyboard-wedge scanners appear."""
    try:
        import evdev
    except ImportError:
        return []
    found = []
    for path in evdev.list_devices():
        try:
            device = evdev.InputDevice(path)
        except OSError:
            continue
        try:
            keys = device.capabilities().get(evdev.ecodes.EV_KEY, [])
            if evdev.ecodes.KEY_ENTER not in keys:
                continue
            found.append(
                FoundDevice(
                    kind="input",
                    path=path,
                    stable_path="",
                    name=device.name,
                    vid_pid=f"{device.info.vendor:04x}:{device.info.product:04x}",
                    note=device.phys or "",
                )
            )
        finally:
            device.close()
    return found


def find_serial_ports(by_id: Path = SERIAL_BY_ID) -> list[FoundDevice]:
    return [
        FoundDevice(
            kind="serial", path=target, stable_path=link, name=Path(link).name.removeprefix("usb-")
        )
        for target, link in sorted(_links_by_target(by_id).items())
    ]


def find_devices() -> list[FoundDevice]:
    return find_cameras() + find_input_devices() + find_serial_ports()
