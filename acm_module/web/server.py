"""The web process: uvicorn serving the API (and what rooms above mount on it, the console) on
`web_http`.

The supervisor forks it after the workers (`web_main`), like the MI and metrics processes:
it dies with its parent and is restarted when it exits. Everything here (the event loop, the
ZeroMQ context, store and database connections) is created in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acm_module.control.auth import parse_bind
from acm_module.core.errors import BOOT_ERROR, ConfigError, StoreError
from acm_module.web.security import Passwords, check_boot, new_password
from acm_module.web.users import User, UserRepository, now_ms, open_users

if TYPE_CHECKING:
    from acm_module.control.commands import CommandFactory

log = logging.getLogger("acm.web")

BOOTSTRAP_USER = "admin"
BOOTSTRAP_FILE = "web-bootstrap.json"
MAX_CONCURRENCY = 2048

# What a room above web/ adds to the API's app (its routes, static files), called with the app
# and the settings once the API is built: cli.py hands in the console's `mount`.
Mount = Callable[[Any, Any], None]


def bootstrap_admin(users: UserRepository, state_dir: str | Path, out: Any = None
                    ) -> str | None:
    """Give a repository with no user at all the `admin` user; return its password when it was
    generated now (None otherwise).

    The first time, the password is generated and printed once, and its hash kept in
    `<state_dir>/web-bootstrap.json` (mode 0600): a repository that loses its users later (the
    embedded store of `scripts/run.sh` starts empty each time) gets the same admin back, and
    nothing is printed again.
    """
    if users.user_list():
        return None
    path = Path(state_dir) / BOOTSTRAP_FILE
    password = None
    try:
        pw_hash = json.loads(path.read_text())["password_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        password = new_password()
        pw_hash = Passwords().hash(password)
    user = User(name=BOOTSTRAP_USER, role="admin", password_hash=pw_hash, created_ms=now_ms())
    if not users.user_add_first(user):
        return None
    if password is None:
        log.info("web: restored the bootstrap user %r from %s", BOOTSTRAP_USER, path)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"user": BOOTSTRAP_USER, "password_hash": pw_hash}, f)
    # Printed, not logged: log redaction would hide it, and it must be seen exactly once.
    print(f"acm web: created user {BOOTSTRAP_USER!r} with password {password} "
          "(shown once: change it in the console or with PATCH /api/v1/users/admin)",
          file=out or sys.stderr, flush=True)
    return password


def _bootstrap_until_done(users: UserRepository, state_dir: str, stop: threading.Event
                          ) -> None:
    while not stop.is_set():
        try:
            bootstrap_admin(users, state_dir)
            return
        except (StoreError, OSError) as e:
            log.warning("web: user repository unavailable (%s); retrying", e)
            stop.wait(5.0)


def listen(web_http: str) -> socket.socket:
    """Bind and listen on web_http (host:port). Raises ConfigError, OSError."""
    bind = parse_bind(web_http, "web_http")
    fam = socket.AF_INET6 if ":" in bind.host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((bind.host, bind.port))
        s.listen(1024)
    except OSError:
        s.close()
        raise
    s.set_inheritable(False)
    return s


def build_app(settings: Any, extra_commands: Sequence[CommandFactory] = (),
              mounts: Sequence[Mount] = ()) -> Any:
    """Return the ASGI app with its services (control plane, users, pool client).

    extra_commands: added to its control plane (cli.py hands in the alert lifecycle's);
    mounts: called on the app once built (cli.py hands in the console's)."""
    from acm_module.control.commands import Control
    from acm_module.web.api import Services, create_app
    from acm_module.web.decide import pool_client

    control = Control(settings, extra_commands=extra_commands)
    users = open_users(settings)
    pool = pool_client(settings)
    app = create_app(Services(settings, control, users, pool))
    for mount in mounts:
        mount(app, settings)
    return app


def web_main(settings: Any, extra_commands: Sequence[CommandFactory] = (),
             mounts: Sequence[Mount] = ()) -> int:
    """Entry point of the forked web process; return its exit code (3 = boot failure).

    extra_commands and mounts: as build_app takes them."""
    import uvicorn

    from acm_module.web.api import EventsFastPath

    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        check_boot(settings.web_http, settings.api_token)
        sock = listen(settings.web_http)
    except ConfigError as e:
        log.error("web: %s", e)
        return BOOT_ERROR
    except OSError as e:
        log.error("web: cannot listen on %s: %s", settings.web_http, e)
        return BOOT_ERROR
    app = build_app(settings, extra_commands, mounts)
    svc = app.state.services
    stop = threading.Event()
    if not settings.api_token:  # with api_token the operator holds an admin credential already
        threading.Thread(target=_bootstrap_until_done, args=(svc.users, settings.state_dir, stop),
                         name="web-boot", daemon=True).start()
    loop = "uvloop" if _has("uvloop") else "asyncio"
    http = "httptools" if _has("httptools") else "h11"
    config = uvicorn.Config(EventsFastPath(app, svc), loop=loop, http=http, log_config=None,
                            access_log=False, server_header=False, timeout_keep_alive=30,
                            # Past this many connections and requests at once: 503, not memory.
                            limit_concurrency=MAX_CONCURRENCY,
                            timeout_graceful_shutdown=5, lifespan="on")
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    log.info("REST API on http://%s:%d/api/v1 (OpenAPI: /openapi.json)", host, port)
    try:
        if loop == "uvloop":
            _run_uvloop(server, sock)
        else:
            asyncio.run(server.serve(sockets=[sock]))
    finally:
        stop.set()
        sock.close()
        with contextlib.suppress(Exception):
            svc.control.close()
        with contextlib.suppress(Exception):
            svc.users.close()
    return 0


def _run_uvloop(server: Any, sock: socket.socket) -> None:
    import uvloop

    uvloop.run(server.serve(sockets=[sock]))


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


__all__ = ["bootstrap_admin", "web_main"]
