"""`edgenode devices`: cameras and serial ports found with their stable paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from drivers.discovery import find_cameras, find_serial_ports
from edgenode.cli import main


def fake_camera(root: Path, node: str, name: str, by_id: Path, link_name: str) -> None:
    """Lay out a sysfs entry and a by-id link for a camera, as the kernel and udev do."""
    usb_device = root / "usb" / "1-1"
    interface = usb_device / "1-1:1.0"
    interface.mkdir(parents=True, exist_ok=True)
    (usb_device / "idVendor").write_text("046d\n")
    (usb_device / "idProduct").write_text("0825\n")
    entry = root / "class" / node
    entry.mkdir(parents=True)
    (entry / "name").write_text(f"{name}\n")
    (entry / "index").write_text("0\n")
    (entry / "device").symlink_to(interface)
    by_id.mkdir(parents=True, exist_ok=True)
    (by_id / link_name).symlink_to(f"/dev/{node}")


def test_camera_is_listed_with_stable_path_and_usb_id(tmp_path: Path) -> None:
    by_id = tmp_path / "v4l-by-id"
    fake_camera(tmp_path, "video0", "UVC Camera (046d:0825)", by_id, "usb-Logitech-video-index0")
    (camera,) = find_cameras(tmp_path / "class", by_id)
    assert camera.path == "/dev/video0"
    assert camera.stable_path == str(by_id / "usb-Logitech-video-index0")
    assert camera.vid_pid == "046d:0825"
    assert camera.name == "UVC Camera (046d:0825)"


def test_missing_sysfs_gives_no_cameras(tmp_path: Path) -> None:
    assert find_cameras(tmp_path / "absent", tmp_path / "absent-too") == []


def test_serial_port_is_listed_by_its_by_id_link(tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        target = os.ttyname(slave)
        (tmp_path / "usb-Newland_Scanner-if00").symlink_to(target)
        (port,) = find_serial_ports(tmp_path)
    finally:
        os.close(master)
        os.close(slave)
    assert port.path == target
    assert port.stable_path == str(tmp_path / "usb-Newland_Scanner-if00")
    assert port.name == "Newland_Scanner-if00"


def test_devices_command_prints_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "--json"]) == 0
    for line in capsys.readouterr().out.splitlines():
        assert {"kind", "path", "stable_path", "name"} <= set(json.loads(line))
