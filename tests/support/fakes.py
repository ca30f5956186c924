"""Stand-ins for what is in no registry here: OpenSIPS's MI (dlg_end_dlg) and a webhook receiver.

`FakeOpenSIPS` answers exactly like OpenSIPS 3.6 (modules/dialog/dlg_req_within.c
mi_terminate_dlg, mi/mi.c, mi/item.c, modules/mi_http/mi_http.c):
- `dlg_end_dlg` recipes: {dialog_id} and {dialog_id, extra_hdrs} (named or positional);
- a known dialog (OpenSIPS takes a numeric dialog id or a Call-ID; here Call-IDs) ->
  `"result": "OK"`;
- unknown -> error {"code": 404, "message": "Requested Dialog not found"};
- params matching no recipe -> -32602 "Invalid params" with data "Named parameters do not
  match" / "Too few or too many parameters"; a non-string param -> data "Bad type for parameter
  '<name>'"; an unknown method -> -32601 "Method not found"; bad JSON -> -32700 "Parse error";
- mi_http: POST only (405 otherwise), HTTP 200 for results and errors alike, 202 and no body for a
  notification; mi_datagram: the reply goes back to the sender's address.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

RECIPES = ({"dialog_id"}, {"dialog_id", "extra_hdrs"})


class FakeOpenSIPS:
    """A dialog table and an MI endpoint (HTTP and UDP) that records every dlg_end_dlg."""

    def __init__(self) -> None:
        self.dialogs: set[str] = set()
        self.calls: list[dict[str, Any]] = []  # every dlg_end_dlg request's params
        self.ended: list[tuple[str, str | None]] = []  # (call-id, extra_hdrs) of BYEs sent
        self.fail_with: int | None = None  # answer every end with this error code (500, 403)
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not raw:
                    self.send_response(400)
                    self.end_headers()
                    return
                reply = owner.handle(raw)
                if reply is None:
                    self.send_response(202)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def do_GET(self) -> None:
                self.send_response(405)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http_port = self.http.server_address[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.settimeout(0.2)
        self.udp_port = self.udp.getsockname()[1]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self.http.serve_forever, daemon=True),
                         threading.Thread(target=self._udp_loop, daemon=True)]
        for t in self._threads:
            t.start()

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/mi"

    @property
    def udp_url(self) -> str:
        return f"udp:127.0.0.1:{self.udp_port}"

    def add_dialog(self, call_id: str) -> None:
        """The routing script created a dialog for an allowed INVITE."""
        with self._lock:
            self.dialogs.add(call_id)

    def _udp_loop(self) -> None:
        while not self._stop.is_set():
            try:
                raw, peer = self.udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self.handle(raw)
            if reply is not None:
                with contextlib.suppress(OSError):
                    self.udp.sendto(reply, peer)

    # -- the JSON-RPC core -------------------------------------------------------------------
    def handle(self, raw: bytes) -> bytes | None:
        try:
            req = json.loads(raw)
        except ValueError:
            return _error(None, -32700, "Parse error")
        if not isinstance(req, dict) or not isinstance(req.get("method"), str):
            return _error(req.get("id") if isinstance(req, dict) else None, -32600,
                          "Invalid Request")
        rid = req.get("id")
        if req["method"] != "dlg_end_dlg":
            out = _error(rid, -32601, "Method not found")
        else:
            out = self._end_dlg(rid, req.get("params"))
        return None if "id" not in req else out

    def _end_dlg(self, rid: Any, params: Any) -> bytes:
        if isinstance(params, list):
            if not 1 <= len(params) <= 2:
                return _error(rid, -32602, "Invalid params", "Too few or too many parameters")
            params = dict(zip(("dialog_id", "extra_hdrs"), params, strict=False))
        if not isinstance(params, dict) or set(params) not in RECIPES:
            return _error(rid, -32602, "Invalid params", "Named parameters do not match")
        for name, value in params.items():
            if not isinstance(value, str):
                return _error(rid, -32602, "Invalid params",
                              f"Bad type for parameter '{name}'")
        with self._lock:
            self.calls.append(dict(params))
            if self.fail_with is not None:
                return _error(rid, self.fail_with, "Operation failed")
            cid = params["dialog_id"]
            if cid not in self.dialogs:
                return _error(rid, 404, "Requested Dialog not found")
            self.dialogs.discard(cid)
            self.ended.append((cid, params.get("extra_hdrs")))
        return _dump({"jsonrpc": "2.0", "result": "OK", "id": rid})

    def close(self) -> None:
        self._stop.set()
        self.http.shutdown()
        self.http.server_close()
        self.udp.close()
        for t in self._threads:
            t.join(2)


def _dump(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error(rid: Any, code: int, message: str, data: str | None = None) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return _dump({"jsonrpc": "2.0", "error": err, "id": rid})


class WebhookReceiver:
    """An HTTP server that fails the first `fail_first` requests (with `fail_status`, or by
    sleeping `delay_first` s) and records every request (headers, body, time)."""

    def __init__(self, fail_first: int = 0, fail_status: int = 503, delay_first: float = 0.0,
                 final_status: int = 200, location: str | None = None) -> None:
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.delay_first = delay_first
        self.final_status = final_status
        self.location = location  # sent with every answer (a redirect when the status is 3xx)
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.do_POST()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with owner._lock:
                    n = len(owner.requests)
                    owner.requests.append({"headers": dict(self.headers.items()),
                                           "body": body, "path": self.path,
                                           "method": self.command})
                if n < owner.fail_first:
                    if owner.delay_first:
                        owner._release.wait(owner.delay_first)
                        return  # no answer at all: the client times out
                    self.send_response(owner.fail_status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(owner.final_status)
                if owner.location:
                    self.send_header("Location", owner.location)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(2)
