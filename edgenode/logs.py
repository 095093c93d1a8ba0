"""structlog set-up: JSON lines under systemd and in pipes, readable output in a terminal.

Events are named for what happened (``verdict_recorded``, ``snapshot_rejected``) and carry
ids as fields. Callers never pass a raw payload or an ID number. As a second line of defence,
``redact_sensitive`` replaces any bytes value and any field named like a payload, an ID number
or a name before an event is rendered.

Under systemd (``$JOURNAL_STREAM`` or ``$INVOCATION_ID`` set) stderr goes to journald, which
stores each JSON line as the message, so ``journalctl -o cat`` prints the JSON back.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Field names whose text values are replaced: raw code contents and personal data.
SENSITIVE_FIELDS = frozenset(
    {"payload", "raw", "text", "id_number", "name", "full_name", "display_name"}
)
REDACTED = "[redacted]"


def under_systemd() -> bool:
    """Return whether systemd started this process, so stderr is connected to journald.

    systemd sets INVOCATION_ID for every unit it starts and JOURNAL_STREAM when stdout or
    stderr is connected to the journal (systemd.exec(5)).
    """
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def redact_sensitive(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Replace bytes values and text in sensitive fields with a length-only placeholder."""
    for key, value in event_dict.items():
        if isinstance(value, bytes | bytearray):
            event_dict[key] = f"{REDACTED} {len(value)} bytes"
        elif key in SENSITIVE_FIELDS and isinstance(value, str):
            event_dict[key] = f"{REDACTED} {len(value)} characters"
    return event_dict


def configure_logging(level: str = "info", *, json_output: bool | None = None) -> None:
    """Configure structlog for the process: JSON under systemd or in a pipe, else console.

    ``json_output`` forces one of the two renderers.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    if json_output is None:
        json_output = under_systemd() or not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer(ensure_ascii=False)
        if json_output
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_sensitive,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
