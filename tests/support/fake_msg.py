"""A stand-in for the `OpenSIPS.msg` object the python module passes to python_exec() methods.

Mirrors modules/python/python_msgobj.c of OpenSIPS 3.6: get_pseudoVar(format) returns the
pv_printf() rendering ("<null>" for an unset variable), set_pseudoVar(name, value) accepts
two str and returns None, getHeader(name) returns str or None, and the read-only attributes
Type, Method, Status, RURI, src_address, dst_address.
"""

from __future__ import annotations

from collections.abc import Iterable


class FakeMsg:
    """A SIP request as python_exec() shows it; `fail` names methods that raise."""

    def __init__(self, pvs: dict[str, str] | None = None, *, headers: dict[str, str] | None = None,
                 fail: Iterable[str] = ()) -> None:
        self.pvs: dict[str, str] = {
            "$ci": "call-1@example",
            "$fU": "2348031234567",
            "$fu": "sip:2348031234567@10.0.0.1",
            "$rU": "2348097654321",
            "$ru": "sip:2348097654321@10.0.0.2",
            "$si": "10.0.0.1",
        }
        if pvs:
            self.pvs.update(pvs)
        self.headers = headers or {}
        self.fail = set(fail)
        self.vars: dict[str, str] = {}
        # values as raw octets (e.g. not UTF-8), seen only through fields()
        self.raw: dict[str, bytes] = {}

    def fields(self, trunk: str | bytes = "<null>") -> str:
        """Return what opensips.cfg passes to acm_check_fields for this message, rendered
        the way OpenSIPS 3.6 renders acm_opensips.FIELDS_FORMAT: each value cut to its
        limit with {s.substr,0,N} (which fails on an empty value: "<null>"), then
        {s.encode.hexa}; "00" between them. Values may be bytes (any octet of a message)."""
        out = []
        for spec, limit in (("$ci", 256), ("$fU", 256), ("$rU", 256), ("$si", 0),
                            ("trunk", 128)):
            v = trunk if spec == "trunk" else self.raw.get(spec, self.pvs.get(spec, "<null>"))
            data = v if isinstance(v, bytes) else v.encode()
            if data == b"<null>" or (limit and not data):
                out.append("<null>")
            else:
                out.append((data[:limit] if limit else data).hex())
        return "00".join(out)

    # -- methods ------------------------------------------------------------------------
    def get_pseudoVar(self, spec: str) -> str:
        """Return the rendering of `spec`, "<null>" when unset."""
        if "get_pseudoVar" in self.fail:
            raise RuntimeError("self->msg is NULL")
        if spec.startswith("$var(") and spec.endswith(")"):
            return self.vars.get(spec[5:-1], "<null>")
        return self.pvs.get(spec, "<null>")

    def set_pseudoVar(self, name: str, value: str) -> None:
        """Store a $var; like the C code, only two str arguments are accepted."""
        if "set_pseudoVar" in self.fail:
            raise RuntimeError("args is not valid")
        if not isinstance(name, str) or not isinstance(value, str):
            raise RuntimeError("args is not valid")
        if not (name.startswith("$var(") and name.endswith(")")):
            return  # the C code silently ignores what it cannot write
        self.vars[name[5:-1]] = value

    def getHeader(self, name: str) -> str | None:
        """Return the body of header `name`, or None."""
        if "getHeader" in self.fail:
            raise RuntimeError("self->msg is NULL")
        for k, v in self.headers.items():
            if k.lower() == name.lower():
                return v
        return None

    def rewrite_ruri(self, uri: str) -> None:
        """Replace the Request-URI."""
        self.pvs["$ru"] = uri

    def set_dst_uri(self, uri: str) -> None:
        """Set the destination URI."""
        self.pvs["$du"] = uri

    def call_function(self, name: str, *args: str) -> int:
        """Pretend to run a module function."""
        return 1

    # -- attributes ---------------------------------------------------------------------
    Type = "SIP_REQUEST"
    Method = "INVITE"
    Status = None

    @property
    def RURI(self) -> str:
        """Return the Request-URI."""
        return self.pvs["$ru"]

    @property
    def src_address(self) -> tuple[str, int]:
        """Return (ip, port) of the sender."""
        return (self.pvs["$si"], 5060)

    @property
    def dst_address(self) -> tuple[str, int]:
        """Return (ip, port) the request arrived on."""
        return ("127.0.0.1", 5060)
