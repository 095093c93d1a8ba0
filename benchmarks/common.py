"""Machine description and percentiles shared by the core benchmarks.

The benchmark scripts import this module by path (they put this folder on ``sys.path``), so it
is not part of the installed package.
"""

from __future__ import annotations

import math
import os
import platform
import sqlite3
import subprocess
from pathlib import Path


def cpu_model() -> str:
    """Return the first ``model name`` in /proc/cpuinfo, or ``unknown`` where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def file_system(path: Path) -> str:
    """Return the file system type and device of ``path`` as ``df -T`` reports them."""
    try:
        result = subprocess.run(
            ["df", "-T", str(path)], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown (df -T failed: {exc})"
    lines = result.stdout.splitlines()
    if len(lines) < 2:
        return "unknown (df -T printed no data line)"
    fields = lines[1].split()
    return f"{fields[1]} on {fields[0]}" if len(fields) >= 2 else lines[1]


def machine_lines(workdir: Path) -> list[str]:
    """Describe the machine as Markdown list items: CPU, cores, memory, versions, disk."""
    return [
        f"- CPU: {cpu_model()}, `os.cpu_count()` = {os.cpu_count()}",
        f"- Memory: {_memory_total()}",
        f"- Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{platform.system()} {platform.release()}",
        f"- Work folder {workdir}: {file_system(workdir)}",
        "- The machine is shared with other jobs, so absolute times vary from run to run. "
        "Compare medians and the ratios measured within one run.",
    ]


def _memory_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError):
        pass
    return "unknown"


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of ``values``, e.g. ``fraction=0.99`` for p99."""
    if not values:
        raise ValueError("percentile of an empty list")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]
