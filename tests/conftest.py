"""Shared test set-up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def reset_structlog() -> Iterator[None]:
    """Undo the logging set-up that a CLI call in an earlier test made.

    `edgenode.cli.main` configures structlog globally, with a level filter that would hide
    info events from `structlog.testing.capture_logs` in later tests.
    """
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
