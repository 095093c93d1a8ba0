"""The guard's screen: an aiohttp server in the daemon's event loop, pushing over a WebSocket.

Routes: ``/`` the page, ``/static/*`` its script and style, ``/ws`` the push channel (a hello
with the labels, then verdicts, overrides and a status whenever it changes), and the guard's
actions ``POST /api/sign-in``, ``/api/sign-out``, ``/api/id-check`` and ``/api/override``.
Every rejected request gets a JSON body ``{"error": code, "message": text}``.

Privacy: request bodies are never logged, and aiohttp's access log is off, because a query
string may carry the screen token and a body may carry an ID number or a PIN.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import structlog
from aiohttp import WSMsgType, web

from edgenode.config import ScreenConfig
from edgenode.gate_status import GateStatus
from edgenode.guard_desk import (
    OVERRIDE_DECISIONS,
    OVERRIDE_REASONS,
    GuardDeskError,
    GuardSession,
    OverrideDecision,
    OverrideEvent,
)
from edgenode.i18n import Translator
from edgenode.pipeline import VerdictEvent
from edgenode.screen import views

log = structlog.get_logger("edgenode.screen")

STATIC_DIR = Path(__file__).parent / "static"
COOKIE = "edgenode_screen"
STATUS_INTERVAL_S = 1.0
# Messages queued for one page beyond this mean the page stopped reading: it is disconnected
# and reconnects, then gets the current state again.
CLIENT_QUEUE_SIZE = 64
MAX_BODY_BYTES = 16 * 1024
GUARD_ID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
PIN = re.compile(r"^[0-9]{6,12}$")
ID_NUMBER = re.compile(r"^[0-9]{17}[0-9X]$")

# HTTP status per error code; codes not listed here get 400.
STATUS_CODES: dict[str, int] = {
    "unauthorised": 401,
    "unknown_guard": 401,
    "wrong_pin": 401,
    "not_signed_in": 401,
    "origin_mismatch": 403,
    "not_found": 404,
    "verdict_not_found": 404,
    "method_not_allowed": 405,
    "already_overridden": 409,
    "not_overridable": 409,
    "too_large": 413,
    "locked_out": 429,
    "internal_error": 500,
    "id_lookup_unavailable": 503,
    "not_available": 503,
}


class GuardDaemon(Protocol):
    """The part of ``edgenode.daemon.Daemon`` that the screen calls."""

    @property
    def guard_session(self) -> GuardSession | None: ...
    async def status(self) -> GateStatus: ...
    async def sign_in(self, guard_id: str, pin: str) -> GuardSession: ...
    def sign_out(self) -> None: ...
    async def check_id_number(self, id_number: str) -> VerdictEvent: ...
    async def override(
        self, verdict_seq: int, decision: OverrideDecision, reason: str
    ) -> OverrideEvent: ...


class NetworkState(Protocol):
    """The MQTT connection's state, as ``sync.connection.Connection`` reports it."""

    @property
    def connected(self) -> bool: ...


class RequestRejected(Exception):
    """A request the page must correct: ``code`` is one of ``views.ERRORS``."""

    def __init__(self, code: str) -> None:
        self.code = code
        super().__init__(code)


class ScreenServer:
    """The web page and its push channel, as one daemon service (``run``).

    ``on_verdict`` and ``on_override`` are the daemon's listeners; they run on the pipeline
    thread and hand the message to the event loop.
    """

    def __init__(
        self,
        config: ScreenConfig,
        translator: Translator,
        *,
        network: NetworkState | None = None,
    ) -> None:
        """``network`` is the sync connection, None where sync is off (no network banner)."""
        self.config = config
        self.tr = translator
        self.network = network
        self.port: int | None = None
        self._daemon: GuardDaemon | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._status: dict[str, Any] | None = None
        # Set by each verdict, so today's counts change with it instead of up to a second later.
        self._status_due = asyncio.Event()
        # The verdict on screen and its time.monotonic(), for pages that connect meanwhile.
        self._last_verdict: tuple[dict[str, Any], float] | None = None

    def service(self, daemon: GuardDaemon) -> tuple[str, Callable[[], Awaitable[None]]]:
        """Return the (name, coroutine) pair that ``Daemon(services=...)`` runs."""
        self._daemon = daemon
        return ("screen", self.run)

    # --- listeners, on the pipeline thread ---

    def on_verdict(self, event: VerdictEvent) -> None:
        self._publish_threadsafe(views.verdict_message(event, self.tr))

    def on_override(self, event: OverrideEvent) -> None:
        self._publish_threadsafe(views.override_message(event, self.tr))

    def _publish_threadsafe(self, message: dict[str, Any]) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._publish, message)

    def _publish(self, message: dict[str, Any]) -> None:
        if message["type"] == "verdict":
            self._last_verdict = (message, time.monotonic())
            self._status_due.set()
        for queue in list(self._clients):
            self._offer(queue, message)

    def _offer(self, queue: asyncio.Queue[dict[str, Any] | None], message: dict[str, Any]) -> None:
        try:
            queue.put_nowait(message)
        except asyncio.QueueFull:
            # The page stopped reading; closing its socket makes it reconnect with fresh state.
            self._clients.discard(queue)
            queue.get_nowait()
            queue.put_nowait(None)
            log.warning("screen_client_dropped", queued=CLIENT_QUEUE_SIZE)

    # --- the service ---

    async def run(self) -> None:
        """Serve until cancelled, pushing the status whenever it changes."""
        self._loop = asyncio.get_running_loop()
        runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.config.host, self.config.port)
            await site.start()
            self.port = int(runner.addresses[0][1])
            log.info("screen_started", host=self.config.host, port=self.port)
            while True:
                await self._refresh_status()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._status_due.wait(), STATUS_INTERVAL_S)
                self._status_due.clear()
        finally:
            for queue in list(self._clients):
                self._offer(queue, {"type": "closing"})
            await runner.cleanup()
            log.info("screen_stopped", port=self.port)

    async def _refresh_status(self) -> None:
        daemon = self._require_daemon()
        status = views.status_message(
            await daemon.status(),
            self.tr,
            network_up=None if self.network is None else self.network.connected,
            session=daemon.guard_session,
        )
        if status != self._status:
            self._status = status
            self._publish(status)

    def _require_daemon(self) -> GuardDaemon:
        if self._daemon is None:
            raise RuntimeError("ScreenServer.service(daemon) was not called")
        return self._daemon

    def build_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._errors, self._authorise], client_max_size=MAX_BODY_BYTES
        )
        app.router.add_get("/", self._page)
        app.router.add_static("/static", STATIC_DIR)
        app.router.add_get("/ws", self._websocket)
        app.router.add_post("/api/sign-in", self._sign_in)
        app.router.add_post("/api/sign-out", self._sign_out)
        app.router.add_post("/api/id-check", self._id_check)
        app.router.add_post("/api/override", self._override)
        return app

    # --- middlewares ---

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except RequestRejected as exc:
            log.info("screen_request_rejected", path=request.path, error=exc.code)
            return self._error(exc.code)
        except GuardDeskError as exc:
            log.info("screen_action_rejected", path=request.path, reason=exc.reason)
            return self._error(exc.reason)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
            code = codes.get(exc.status, "invalid_json")
            log.info("screen_request_rejected", path=request.path, error=code, status=exc.status)
            return self._error(code, exc.status)
        except NotImplementedError:
            log.warning("screen_action_not_available", path=request.path)
            return self._error("not_available")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The page gets a code and a message; the details go to the log only.
            log.exception("screen_request_failed", path=request.path, error=repr(exc))
            return self._error("internal_error")

    @web.middleware
    async def _authorise(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and origin != f"http://{request.host}":
            raise RequestRejected("origin_mismatch")
        token = self.config.token
        if token is None:
            return await handler(request)
        offered = request.query.get("token")
        if request.path == "/" and offered is not None and _same(offered, token):
            # Move the token from the address into a cookie, so it leaves the address bar.
            response = web.HTTPSeeOther("/")
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict")
            raise response
        if _same(request.cookies.get(COOKIE, ""), token):
            return await handler(request)
        raise RequestRejected("unauthorised")

    def _error(self, code: str, status: int | None = None) -> web.Response:
        return web.json_response(
            views.error_body(code, self.tr), status=status or STATUS_CODES.get(code, 400)
        )

    # --- the page and its push channel ---

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        socket = web.WebSocketResponse(heartbeat=10.0)
        await socket.prepare(request)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=CLIENT_QUEUE_SIZE)
        queue.put_nowait(views.hello_message(self.tr, clear_after_s=self.config.clear_after_s))
        if self._status is not None:
            queue.put_nowait(self._status)
        if self._last_verdict is not None:
            verdict, shown_at = self._last_verdict
            if time.monotonic() - shown_at < self.config.clear_after_s:
                queue.put_nowait(verdict)
        self._clients.add(queue)
        log.info("screen_client_connected", clients=len(self._clients))
        reader = asyncio.create_task(self._drain(socket), name="screen-ws-reader")
        try:
            while not socket.closed:
                message = await queue.get()
                if message is None:
                    break
                await socket.send_json(message)
                if message["type"] == "closing":
                    break
        except ConnectionResetError:
            pass
        finally:
            self._clients.discard(queue)
            reader.cancel()
            await socket.close()
            log.info("screen_client_disconnected", clients=len(self._clients))
        return socket

    async def _drain(self, socket: web.WebSocketResponse) -> None:
        # The page sends nothing; reading is what notices its close frame.
        async for message in socket:
            if message.type == WSMsgType.ERROR:
                break

    # --- the guard's actions ---

    async def _sign_in(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        guard_id = _text_field(body, "guard_id", GUARD_ID, "guard_id_invalid")
        pin = _text_field(body, "pin", PIN, "pin_invalid")
        session = await self._require_daemon().sign_in(guard_id, pin)
        log.info("screen_guard_signed_in", guard=session.guard_id)
        await self._refresh_status()
        return web.json_response({"guard_id": session.guard_id, "ends_at": session.ends_at})

    async def _sign_out(self, request: web.Request) -> web.Response:
        self._require_daemon().sign_out()
        await self._refresh_status()
        return web.json_response({})

    async def _id_check(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        value = body.get("id_number")
        id_number = value.strip().upper() if isinstance(value, str) else ""
        if not ID_NUMBER.match(id_number):
            raise RequestRejected("id_number_malformed")
        event = await self._require_daemon().check_id_number(id_number)
        # The ID number itself is never logged; the verdict's seq identifies the check.
        log.info("screen_id_checked", seq=event.record.seq, verdict=event.record.verdict)
        return web.json_response(views.verdict_message(event, self.tr))

    async def _override(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        seq = body.get("verdict_seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise RequestRejected("verdict_seq_invalid")
        decision = body.get("decision")
        if decision not in OVERRIDE_DECISIONS:
            raise RequestRejected("unknown_decision")
        reason = body.get("reason")
        if not isinstance(reason, str) or reason not in OVERRIDE_REASONS:
            raise RequestRejected("unknown_reason")
        chosen: OverrideDecision = "admit" if decision == "admit" else "refuse"
        event = await self._require_daemon().override(seq, chosen, reason)
        log.info(
            "screen_override_recorded",
            seq=event.record.seq,
            verdict_seq=seq,
            decision=chosen,
            reason=reason,
            guard=event.guard_id,
        )
        return web.json_response(views.override_message(event, self.tr))


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestRejected("invalid_json") from exc
    if not isinstance(body, dict):
        raise RequestRejected("invalid_json")
    return body


def _text_field(body: dict[str, Any], name: str, pattern: re.Pattern[str], code: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not pattern.match(value):
        raise RequestRejected(code)
    return value


def _same(offered: str, token: str) -> bool:
    return hmac.compare_digest(offered.encode(), token.encode())
