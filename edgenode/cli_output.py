"""Verdict output for people (one line) and for programs (JSON)."""

from __future__ import annotations

from typing import Any

from edgenode.i18n import Translator
from edgenode.messages import describe
from edgenode.pipeline import VerdictEvent


def verdict_json(event: VerdictEvent, source: str, tr: Translator) -> dict[str, Any]:
    verdict = event.verdict
    resident = verdict.resident
    return {
        "file": source,
        "time_s": round(event.source_time_s, 3),
        "seq": event.record.seq,
        "station": event.station,
        "verdict": verdict.outcome.value,
        "reasons": [str(reason) for reason in verdict.reasons],
        "latency_ms": round(event.record.latency_ms or 0.0, 3),
        "message": describe(verdict, tr),
        "resident": None
        if resident is None
        else {
            "name": resident.display_name,
            "building": resident.building,
            "unit": resident.unit,
            "role": resident.role.value,
        },
        "health_subject": event.record.health_subject,
        "community_subject": event.record.community_subject,
    }


def format_verdict_line(event: VerdictEvent, tr: Translator) -> str:
    resident = event.verdict.resident
    who = ""
    if resident is not None:
        who = f"  {resident.display_name} {resident.building}-{resident.unit}"
    latency = event.record.latency_ms or 0.0
    return (
        f"[{event.source_time_s:7.2f}s] #{event.record.seq:<5} {describe(event.verdict, tr)}"
        f"{who}  ({latency:.1f} ms)"
    )
