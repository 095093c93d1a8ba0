"""Input devices: cameras, keyboard-wedge and serial scanners, video files.

``create_source`` builds the source that a ``[[sources]]`` config entry names. Each driver
module is imported only when a source of its kind is configured, so a gate without a camera
never loads OpenCV's capture code and a machine without evdev can still run serial scanners.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgenode.codes import TokenPattern
from edgenode.config import (
    CameraSourceConfig,
    HidSourceConfig,
    SerialSourceConfig,
    SourceConfig,
    VideoSourceConfig,
)
from edgenode.decoders import create_decoder
from edgenode.sources import Source


def create_source(
    config: SourceConfig,
    *,
    decoder_backend: str,
    token_patterns: Sequence[TokenPattern] = (),
) -> Source:
    """Build the source for one config entry.

    Frame sources get a decoder of their own, because each decodes in a worker thread of its
    own. Keyboard-wedge scanners use the token patterns to tell a platform URL typed in the
    wrong keyboard layout from an unrecognised one.
    """
    if isinstance(config, CameraSourceConfig):
        from drivers.camera import CameraSource

        return CameraSource(config, decoder=create_decoder(decoder_backend))
    if isinstance(config, VideoSourceConfig):
        from drivers.camera import VideoFileSource

        return VideoFileSource(config, decoder=create_decoder(decoder_backend))
    if isinstance(config, HidSourceConfig):
        from drivers.hid_scanner import HidScanner

        return HidScanner(config, token_patterns=token_patterns)
    if isinstance(config, SerialSourceConfig):
        from drivers.serial_scanner import SerialScanner

        return SerialScanner(config)
    raise TypeError(f"no driver for source config {type(config).__name__}")
