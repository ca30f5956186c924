"""RESP (the Redis protocol) in pure Python: command encoder, reply parser.

The pure-Python twin of ext/resp.pyx and its readable reference.
"""

from __future__ import annotations

from acm_module.engine.types import Incomplete, RespError

__all__ = ["encode_command", "parse_reply"]


def encode_command(*args: bytes | str | int) -> bytes:
    """Encode one command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = b"%d" % a
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def parse_reply(buf: bytes | bytearray, pos: int) -> tuple[object, int]:
    """Parse one RESP2 reply at pos; return (value, next pos). Raises Incomplete.

    Bulk strings come back as bytes, integers as int, nil as None, errors as RespError.
    """
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise Incomplete
    t = buf[pos]
    line = buf[pos + 1:end]
    pos = end + 2
    if t == 0x24:  # $
        n = int(line)
        if n < 0:
            return None, pos
        if pos + n + 2 > len(buf):
            raise Incomplete
        return bytes(buf[pos:pos + n]), pos + n + 2
    if t == 0x3A:  # :
        return int(line), pos
    if t == 0x2A:  # *
        n = int(line)
        if n < 0:
            return None, pos
        items = []
        for _ in range(n):
            v, pos = parse_reply(buf, pos)
            items.append(v)
        return items, pos
    if t == 0x2B:  # +
        return bytes(line), pos
    if t == 0x2D:  # -
        return RespError(line.decode("utf-8", "replace")), pos
    raise ValueError(f"unexpected RESP type byte {t!r}")
