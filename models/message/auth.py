"""Authentication results (RFC 8601 Authentication-Results, RFC 7208 Received-SPF): the SPF, DKIM and DMARC
outcomes recorded by the receiving hosts the operator trusts.
"""

from __future__ import annotations

import re

# Anyone can write these headers into a message; only those the operator's own receiving hosts added are evidence.
# A header counts when its authserv-id (Authentication-Results) or its receiver= (Received-SPF) is one of the
# trusted ids; the receiving MTA is expected to remove headers claiming its own id on arrival (RFC 8601 section 5,
# what OpenDKIM, OpenDMARC and Postfix's milters do). Empty (the default): no header is trusted.
_TRUSTED_AUTHSERV_IDS: frozenset[str] = frozenset()
_AUTH_METHODS = ("spf", "dkim", "dmarc")
_AUTH_RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"})
_MAX_AUTH_HEADERS = 8  # Authentication-Results / Received-SPF headers read [real mail: 1-3]
_MAX_AUTH_CHARS = 2048  # characters of one such header read [real mail: a few hundred]
_MAX_AUTH_RESINFOS = 32  # "method=result" clauses read in one header
_MAX_AUTH_SPECIALS = 64  # ( ) " ; and backslashes in one header [real mail: under 30]; more: not read, a defect


def configure_trusted_authserv_ids(ids: list[str] | tuple[str, ...] | frozenset[str]) -> None:
    """Set which authserv-ids ``parse`` trusts (the process's settings, once at start; lower-cased)."""
    global _TRUSTED_AUTHSERV_IDS
    _TRUSTED_AUTHSERV_IDS = frozenset(i.strip().lower() for i in ids if i.strip())


_AUTH_SPECIALS_RE = re.compile(r'[()";\\]')


def _clauses(value: str) -> list[str] | None:
    """``value`` split at the semicolons outside comments and quoted strings, comments removed; None when it
    has more than ``_MAX_AUTH_SPECIALS`` special characters. One pass that steps only over the special characters
    (found by a C scan; nesting counted, never recursed), so the cost is linear in the (capped) value; a value
    without comments or quotes (most) is split at once."""
    if "(" not in value and '"' not in value and "\\" not in value:
        return value.split(";", _MAX_AUTH_RESINFOS + 1)
    if sum(value.count(c) for c in '()";\\') > _MAX_AUTH_SPECIALS:
        return None
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    quoted = False
    pos = 0  # start of the text not yet copied (or skipped)
    skip_next = -1  # index of a character escaped by a backslash
    for m in _AUTH_SPECIALS_RE.finditer(value):
        i = m.start()
        if i == skip_next:
            continue
        ch = value[i]
        if ch == "\\":
            if quoted or depth:
                skip_next = i + 1
            continue
        if quoted:
            if ch == '"':
                quoted = False
            continue
        if ch == '"' and not depth:
            quoted = True
        elif ch == "(":
            if not depth:
                cur.append(value[pos:i])
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
            if not depth:
                pos = i + 1
        elif ch == ";" and not depth:
            cur.append(value[pos:i])
            out.append("".join(cur))
            cur = []
            pos = i + 1
            if len(out) > _MAX_AUTH_RESINFOS:
                return out
    if not depth:
        cur.append(value[pos:])
    out.append("".join(cur))
    return out


def authentication_results(
    headers: list[tuple[str, str]], trusted: frozenset[str], defects: list[str] | None = None
) -> list[str]:
    """The SPF, DKIM and DMARC outcomes the trusted receiving hosts recorded, as ``"method=result"`` (sorted).

    Authentication-Results headers whose authserv-id is in ``trusted`` are read, the topmost (the last added)
    first: per method the first result counts, except DKIM, which passes when any signature passed (a message
    may carry several). Received-SPF (its result word, trusted when its ``receiver=`` is) fills in SPF when no
    Authentication-Results gave one. Work is bounded: at most ``_MAX_AUTH_HEADERS`` headers of
    ``_MAX_AUTH_CHARS`` characters each, each scanned once; a header past a cap is left out ("auth_capped")."""
    found: dict[str, str] = {}
    spf_header: str | None = None
    seen = 0
    for name, value in headers:
        if name != "authentication-results" and name != "received-spf":
            continue
        seen += 1
        if seen > _MAX_AUTH_HEADERS:
            if defects is not None and "auth_capped" not in defects:
                defects.append("auth_capped")
            break
        value = value[:_MAX_AUTH_CHARS].lower()
        if name == "authentication-results":
            ident = value.lstrip().split(";", 1)[0].split("(", 1)[0].split(None, 1)
            if not ident or ident[0] not in trusted:
                continue  # not the operator's host: not read further
        parts = _clauses(value)
        if parts is None:
            if defects is not None and "auth_capped" not in defects:
                defects.append("auth_capped")
            continue
        if name == "received-spf":
            if spf_header is None and "spf" not in found:
                words = parts[0].split()
                result = words[0] if words else ""
                receiver = ""
                for clause in parts:
                    for kv in clause.split():
                        if kv.startswith("receiver="):
                            receiver = kv[9:].strip('"')
                if result in _AUTH_RESULTS and receiver in trusted:
                    spf_header = result
            continue
        for clause in parts[1:]:
            words = clause.split()
            if not words:
                continue
            method, _, result = words[0].partition("=")
            method = method.partition("/")[0]
            if method not in _AUTH_METHODS or result not in _AUTH_RESULTS:
                continue
            prev = found.get(method)
            if prev is None or (method == "dkim" and result == "pass"):
                found[method] = result
    if "spf" not in found and spf_header is not None:
        found["spf"] = spf_header
    return sorted(f"{m}={r}" for m, r in found.items())
