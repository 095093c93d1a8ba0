"""A real PostgreSQL server for the hub store tests, on a free loopback port.

Import the fixtures into a test module (``from tests.postgres import postgres_server,
postgres_url``). One server runs per test session, in a temporary folder made by ``initdb``;
each test gets a database of its own. The server's programs come from Debian's
``postgresql`` package (``/usr/lib/postgresql/{version}/bin``) or from ``PATH``. PostgreSQL
refuses to run as root, so under root (as in CI) the server runs as the ``postgres`` user
through ``runuser``.

Clients connect over TCP to 127.0.0.1 with a password (SCRAM), as a hub does. Where no server
can be started the tests are skipped with the reason, except under ``CI=true``, where they
fail, so that CI never passes without running them.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from tests.broker import free_port

HOST = "127.0.0.1"
SUPERUSER = "edgenode"
# initdb and a start or stop each finish in a few seconds; these bound a stuck one.
INITDB_TIMEOUT_S = 120
PG_CTL_TIMEOUT_S = 60
START_ATTEMPTS = 3
DEBIAN_BIN_ROOT = Path("/usr/lib/postgresql")


class PostgresUnavailable(Exception):
    """No PostgreSQL server could be started here, with the reason."""


@dataclass
class PostgresServer:
    """A running PostgreSQL cluster owned by this test session."""

    folder: Path
    bin_dir: Path
    port: int
    password: str
    run_as: str | None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@{HOST}:{self.port}/{database}"

    def stop(self) -> None:
        """Stop the server (fast shutdown), then remove its folder."""
        try:
            _run(
                self,
                [
                    str(self.bin_dir / "pg_ctl"),
                    *("stop", "-D", str(self.data_dir), "-m", "fast"),
                    *("-w", "-t", str(PG_CTL_TIMEOUT_S)),
                ],
                timeout_s=PG_CTL_TIMEOUT_S + 10,
            )
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    def read_log(self) -> str:
        try:
            return (self.folder / "server.log").read_text(encoding="utf-8", errors="replace")[
                -4000:
            ]
        except OSError:
            return ""


def find_bin_dir() -> Path:
    """Return the folder of ``initdb`` and ``pg_ctl``: the newest Debian version, else PATH."""
    versions = sorted(
        (path.parent for path in DEBIAN_BIN_ROOT.glob("*/bin/initdb")),
        key=lambda folder: _version_key(folder.parent.name),
    )
    if versions:
        return versions[-1]
    initdb = shutil.which("initdb")
    if initdb is not None:
        return Path(initdb).resolve().parent
    raise PostgresUnavailable(
        "initdb was not found in /usr/lib/postgresql/*/bin or on PATH: install Debian's "
        "postgresql package (./scripts/setup does)"
    )


def start_server() -> PostgresServer:
    """Create a cluster in a new temporary folder and start it on a free loopback port."""
    bin_dir = find_bin_dir()
    run_as = _server_user()
    folder = Path(tempfile.mkdtemp(prefix="edgenode-pg-"))
    password = secrets.token_urlsafe(16)
    server = PostgresServer(folder, bin_dir, 0, password, run_as)
    try:
        password_file = folder / "password"
        password_file.write_text(password + "\n", encoding="utf-8")
        if run_as is not None:
            entry = pwd.getpwnam(run_as)
            os.chown(folder, entry.pw_uid, entry.pw_gid)
            os.chown(password_file, entry.pw_uid, entry.pw_gid)
        password_file.chmod(0o600)
        _run(
            server,
            [
                str(bin_dir / "initdb"),
                "-D",
                str(server.data_dir),
                f"--username={SUPERUSER}",
                f"--pwfile={password_file}",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            timeout_s=INITDB_TIMEOUT_S,
        )
        password_file.unlink()
        _start(server)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return server


def _start(server: PostgresServer) -> None:
    """Start pg_ctl on a free port, trying another port if the first was taken meanwhile."""
    problem = ""
    for _ in range(START_ATTEMPTS):
        server.port = free_port()
        options = (
            f"-c listen_addresses={HOST} -p {server.port} "
            f"-c unix_socket_directories={server.folder} -c max_connections=200"
        )
        try:
            _run(
                server,
                [
                    str(server.bin_dir / "pg_ctl"),
                    *("start", "-D", str(server.data_dir)),
                    *("-l", str(server.folder / "server.log"), "-o", options),
                    *("-w", "-t", str(PG_CTL_TIMEOUT_S)),
                ],
                timeout_s=PG_CTL_TIMEOUT_S + 10,
            )
            return
        except PostgresUnavailable as exc:
            problem = f"{exc}; server log: {server.read_log()}"
    raise PostgresUnavailable(f"pg_ctl start failed {START_ATTEMPTS} times: {problem}")


def _run(server: PostgresServer, argv: list[str], *, timeout_s: float) -> None:
    if server.run_as is not None:
        argv = ["runuser", "-u", server.run_as, "--", *argv]
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, cwd=server.folder
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PostgresUnavailable(f"{argv[0]} failed: {exc}") from exc
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-2000:]
        raise PostgresUnavailable(f"{' '.join(argv[:3])} exited with {result.returncode}: {output}")


def _server_user() -> str | None:
    """Return the user to run the server as: ``postgres`` under root, else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise PostgresUnavailable(
            "running as root, and there is no 'postgres' user to run the server as: install "
            "Debian's postgresql package (./scripts/setup does)"
        ) from exc
    if shutil.which("runuser") is None:
        raise PostgresUnavailable("running as root, and runuser (util-linux) is missing")
    return "postgres"


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name))


def _unavailable(reason: str) -> NoReturn:
    """Fail under CI=true, where the PostgreSQL tests must run; skip elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is required under CI=true: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL is not available: {reason}")
    raise AssertionError("unreachable: pytest.skip raises")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session, started on first use and stopped at its end."""
    try:
        server = start_server()
    except PostgresUnavailable as exc:
        _unavailable(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a new, empty database on the session's server, dropped after the test."""
    import psycopg

    name = f"test_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_server.url(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}".encode())
    try:
        yield postgres_server.url(name)
    finally:
        with psycopg.connect(postgres_server.url(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())
