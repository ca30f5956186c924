"""Where the API keeps its users and tokens: PostgreSQL (tables web_users / web_tokens, migration
0006) when `database_url` is set, else the store (like acm_module/control/repository.py).

Store layout (all under the control plane's hash tag):
- HASH `{acm.ctl}:web:users`: name -> JSON {role, pw, created, disabled}
- STRING `{acm.ctl}:web:t:<sha256>`: the token's JSON record; a session token carries a TTL
- SET `{acm.ctl}:web:ut:<name>`: the hashes of a user's tokens (to list and revoke them)

Only a token's SHA-256 is kept. A token's id is the first 16 hex digits of that hash.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from acm_module.core.redis import LazyRedis

T = TypeVar("T")

USERS_KEY = "{acm.ctl}:web:users"
_TOKEN_KEY = "{acm.ctl}:web:t:"
_USER_TOKENS_KEY = "{acm.ctl}:web:ut:"


def now_ms() -> int:
    """Return the time in epoch milliseconds."""
    return int(time.time() * 1000)


@dataclass(frozen=True)
class User:
    """A console/API user."""

    name: str
    role: str
    password_hash: str
    created_ms: int
    disabled: bool = False


@dataclass(frozen=True)
class TokenRecord:
    """What is kept of a token."""

    hash: str
    user: str
    kind: str  # "api" (until revoked) or "session" (a login, until expires_ms)
    name: str
    created_ms: int
    expires_ms: int | None = None

    @property
    def id(self) -> str:
        return self.hash[:16]

    def expired(self, at_ms: int) -> bool:
        return self.expires_ms is not None and self.expires_ms <= at_ms


class UserRepository(Protocol):
    """Users and tokens. Implementations raise StoreError when unavailable."""

    name: str

    def user_get(self, name: str) -> User | None: ...
    def user_put(self, user: User) -> User | None: ...
    def user_add_first(self, user: User) -> bool: ...
    def user_delete(self, name: str) -> User | None: ...
    def user_list(self) -> list[User]: ...
    def token_put(self, rec: TokenRecord) -> None: ...
    def token_get(self, hash_: str) -> TokenRecord | None: ...
    def token_list(self, user: str) -> list[TokenRecord]: ...
    def token_delete(self, user: str, token_id: str) -> TokenRecord | None: ...
    def close(self) -> None: ...


class StoreUserRepository:
    """Users and tokens in the Redis-protocol store (one connection behind a lock)."""

    name = "store"

    def __init__(self, url: str) -> None:
        self.conn = LazyRedis(url, timeout=2.0, connect_timeout=2.0)
        self._lock = threading.Lock()

    def _call(self, *args: Any) -> Any:
        with self._lock:
            return self.conn.execute_command(*args)

    def user_get(self, name: str) -> User | None:
        raw = self._call("HGET", USERS_KEY, name)
        return None if raw is None else _user(name, raw)

    def user_put(self, user: User) -> User | None:
        old = self.user_get(user.name)
        self._call("HSET", USERS_KEY, user.name, _user_json(user))
        return old

    def user_add_first(self, user: User) -> bool:
        # HSETNX on a fresh hash: only when there is no user at all (the bootstrap admin).
        if self._call("HLEN", USERS_KEY):
            return False
        return bool(self._call("HSETNX", USERS_KEY, user.name, _user_json(user)))

    def user_delete(self, name: str) -> User | None:
        old = self.user_get(name)
        if old is not None:
            for rec in self.token_list(name):
                self.token_delete(name, rec.id)
            self._call("HDEL", USERS_KEY, name)
        return old

    def user_list(self) -> list[User]:
        raw = self._call("HGETALL", USERS_KEY)
        users = [_user(name.decode(), v) for name, v in raw.items()]
        return sorted(users, key=lambda u: u.name)

    def token_put(self, rec: TokenRecord) -> None:
        body = json.dumps({"user": rec.user, "kind": rec.kind, "name": rec.name,
                           "created": rec.created_ms, "expires": rec.expires_ms})
        key = _TOKEN_KEY + rec.hash
        if rec.expires_ms is None:
            self._call("SET", key, body)
        else:
            self._call("SET", key, body, "PXAT", rec.expires_ms)
        self._call("SADD", _USER_TOKENS_KEY + rec.user, rec.hash)

    def token_get(self, hash_: str) -> TokenRecord | None:
        raw = self._call("GET", _TOKEN_KEY + hash_)
        if raw is None:
            return None
        rec = _token(hash_, raw)
        return None if rec.expired(now_ms()) else rec

    def token_list(self, user: str) -> list[TokenRecord]:
        hashes = [h.decode() for h in self._call("SMEMBERS", _USER_TOKENS_KEY + user)]
        out: list[TokenRecord] = []
        gone: list[str] = []
        for h in hashes:
            rec = self.token_get(h)
            if rec is None:
                gone.append(h)
            else:
                out.append(rec)
        if gone:  # sessions that expired by TTL
            self._call("SREM", _USER_TOKENS_KEY + user, *gone)
        return sorted(out, key=lambda r: r.created_ms)

    def token_delete(self, user: str, token_id: str) -> TokenRecord | None:
        for h in (x.decode() for x in self._call("SMEMBERS", _USER_TOKENS_KEY + user)):
            if h.startswith(token_id):
                rec = self.token_get(h)
                self._call("DEL", _TOKEN_KEY + h)
                self._call("SREM", _USER_TOKENS_KEY + user, h)
                return rec
        return None

    def close(self) -> None:
        with self._lock:
            self.conn.close()


def _user_json(u: User) -> str:
    return json.dumps({"role": u.role, "pw": u.password_hash, "created": u.created_ms,
                       "disabled": u.disabled})


def _user(name: str, raw: Any) -> User:
    d = json.loads(raw)
    return User(name=name, role=d["role"], password_hash=d["pw"], created_ms=int(d["created"]),
                disabled=bool(d.get("disabled")))


def _token(hash_: str, raw: Any) -> TokenRecord:
    d = json.loads(raw)
    return TokenRecord(hash=hash_, user=d["user"], kind=d["kind"], name=d.get("name", ""),
                       created_ms=int(d["created"]),
                       expires_ms=None if d.get("expires") is None else int(d["expires"]))


class PostgresUserRepository:
    """Users and tokens in tables web_users / web_tokens (one connection behind a lock)."""

    name = "postgres"

    def __init__(self, database_url: str) -> None:
        from acm_module.control.pg_repository import PostgresControlRepository

        # Its connection handling (lazy connect, one retry on a dropped link, StoreError).
        self._pg = PostgresControlRepository(_Url(database_url))

    def _run(self, fn: Callable[[Any], T]) -> T:
        return self._pg._run(fn)

    def user_get(self, name: str) -> User | None:
        row = self._run(lambda c: c.execute(
            f"SELECT {_U_COLS} FROM web_users WHERE name = %s", (name,)).fetchone())
        return None if row is None else _user_row(row)

    def user_put(self, user: User) -> User | None:
        def put(c: Any) -> User | None:
            with c.transaction():
                old = c.execute(f"SELECT {_U_COLS} FROM web_users WHERE name = %s FOR UPDATE",
                                (user.name,)).fetchone()
                c.execute("INSERT INTO web_users (name, role, password_hash, disabled) "
                          "VALUES (%s, %s, %s, %s) ON CONFLICT (name) DO UPDATE SET "
                          "role = EXCLUDED.role, password_hash = EXCLUDED.password_hash, "
                          "disabled = EXCLUDED.disabled, updated_at = NOW()",
                          (user.name, user.role, user.password_hash, user.disabled))
            return None if old is None else _user_row(old)
        return self._run(put)

    def user_add_first(self, user: User) -> bool:
        def add(c: Any) -> bool:
            cur = c.execute("INSERT INTO web_users (name, role, password_hash) "
                            "SELECT %s, %s, %s WHERE NOT EXISTS (SELECT 1 FROM web_users) "
                            "ON CONFLICT (name) DO NOTHING",
                            (user.name, user.role, user.password_hash))
            return bool(cur.rowcount)
        return self._run(add)

    def user_delete(self, name: str) -> User | None:
        def delete(c: Any) -> User | None:
            with c.transaction():
                c.execute("DELETE FROM web_tokens WHERE user_name = %s", (name,))
                row = c.execute(f"DELETE FROM web_users WHERE name = %s RETURNING {_U_COLS}",
                                (name,)).fetchone()
            return None if row is None else _user_row(row)
        return self._run(delete)

    def user_list(self) -> list[User]:
        rows = self._run(lambda c: c.execute(
            f"SELECT {_U_COLS} FROM web_users ORDER BY name").fetchall())
        return [_user_row(r) for r in rows]

    def token_put(self, rec: TokenRecord) -> None:
        from acm_module.control.pg_repository import ms_to_dt

        self._run(lambda c: c.execute(
            "INSERT INTO web_tokens (token_hash, user_name, kind, name, created_at, expires_at)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (rec.hash, rec.user, rec.kind, rec.name, ms_to_dt(rec.created_ms),
             None if rec.expires_ms is None else ms_to_dt(rec.expires_ms))))

    def token_get(self, hash_: str) -> TokenRecord | None:
        row = self._run(lambda c: c.execute(
            f"SELECT {_T_COLS} FROM web_tokens WHERE token_hash = %s "
            "AND (expires_at IS NULL OR expires_at > NOW())", (hash_,)).fetchone())
        return None if row is None else _token_row(row)

    def token_list(self, user: str) -> list[TokenRecord]:
        def list_(c: Any) -> list[TokenRecord]:
            c.execute("DELETE FROM web_tokens WHERE user_name = %s AND expires_at <= NOW()",
                      (user,))
            return [_token_row(r) for r in c.execute(
                f"SELECT {_T_COLS} FROM web_tokens WHERE user_name = %s ORDER BY created_at",
                (user,)).fetchall()]
        return self._run(list_)

    def token_delete(self, user: str, token_id: str) -> TokenRecord | None:
        if not token_id:
            return None
        row = self._run(lambda c: c.execute(
            f"DELETE FROM web_tokens WHERE user_name = %s AND token_hash LIKE %s "
            f"RETURNING {_T_COLS}", (user, token_id.replace("%", "").replace("_", "") + "%"),
        ).fetchone())
        return None if row is None else _token_row(row)

    def close(self) -> None:
        self._pg.close()


@dataclass(frozen=True)
class _Url:
    database_url: str


_U_COLS = "name, role, password_hash, created_at, disabled"
_T_COLS = "token_hash, user_name, kind, name, created_at, expires_at"


def _user_row(r: tuple[Any, ...]) -> User:
    from acm_module.control.pg_repository import _ms

    return User(name=r[0], role=r[1], password_hash=r[2], created_ms=_ms(r[3]),
                disabled=bool(r[4]))


def _token_row(r: tuple[Any, ...]) -> TokenRecord:
    from acm_module.control.pg_repository import _ms

    return TokenRecord(hash=r[0], user=r[1], kind=r[2], name=r[3] or "", created_ms=_ms(r[4]),
                       expires_ms=None if r[5] is None else _ms(r[5]))


def open_users(settings: Any) -> UserRepository:
    """Return the PostgreSQL repository when database_url is set, else the store one."""
    if getattr(settings, "database_url", ""):
        return PostgresUserRepository(settings.database_url)
    return StoreUserRepository(settings.store)

