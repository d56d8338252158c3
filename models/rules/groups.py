"""Every pattern of one target text in one group: one hyperscan database (compiled once and memoised, so that
engines rebuilt after a rule change reuse it) plus the RE2 and budgeted fallbacks of the patterns hyperscan does not
take.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import hyperscan

from models.rules.model import _COMPUTED_HEADERS, Rule, RuleError
from models.rules.patterns import _BT, _HS_FLAGS, _RE2, _Budget, _fallback, _plain, _py_compile, _Spec, _utf8_escapes


class _Group:
    """Every pattern of one target text: one hyperscan database plus RE2 and budgeted fallbacks."""

    __slots__ = (
        "_local",
        "db",
        "empty_hits",
        "fallback",
        "gate",
        "gated",
        "hmod",
        "hname",
        "hs_ids",
        "plain",
        "refused",
        "target",
        "unset",
    )

    def __init__(self, target: str, specs: list[_Spec], rules: Sequence[Rule]) -> None:
        self.target = target
        # a header target "h:<name>[:<mod>][\x00<if-unset>]", parsed once here rather than per message
        key, sep, unset = target[2:].partition("\x00") if target.startswith("h:") else ("", "", "")
        self.hname, _, self.hmod = key.partition(":")
        self.unset: str | None = unset if sep else None
        # an ordinary header without modifier: its text is the header map's entry
        self.plain = not self.hmod and self.hname not in _COMPUTED_HEADERS
        self.fallback: list[tuple[int, int, Any]] = []  # (rule index, engine, compiled)
        self.refused: dict[int, str] = {}  # rule index -> why no engine runs it
        self.db: hyperscan.Database | None = None
        self._local = threading.local()
        by_index = {spec.index: spec for spec in specs}

        def fall_back(idx: int) -> None:
            try:
                engine, rx = _fallback(by_index[idx], rules[idx].name)
            except RuleError as exc:
                self.refused[idx] = str(exc)
                return
            self.fallback.append((idx, engine, rx))

        exprs: list[bytes] = []
        ids: list[int] = []
        flags: list[int] = []
        for spec in specs:
            _py_compile(spec, rules[spec.index].name)  # validates every pattern (``re`` is the rule language)
            hs = _hs_pattern(spec)
            if hs is None:
                fall_back(spec.index)
                continue
            exprs.append(hs[0])
            flags.append(hs[1])
            ids.append(spec.index)
        if exprs and not _hs_try(exprs, ids, flags):
            # some pattern is beyond hyperscan: test each alone (cached), send the others to a fallback
            keep = [k for k in range(len(exprs)) if _hs_single_ok(exprs[k], flags[k])]
            keep_set = set(keep)
            for k in range(len(exprs)):
                if k not in keep_set:
                    fall_back(ids[k])
            exprs = [exprs[k] for k in keep]
            ids = [ids[k] for k in keep]
            flags = [flags[k] for k in keep]
            while exprs and not _hs_try(exprs, ids, flags):  # only together too large: shed
                exprs.pop()
                flags.pop()
                fall_back(ids.pop())
        if exprs:
            self.db = _hs_try(exprs, ids, flags)
        self.hs_ids = ids
        # A budgeted fallback whose pattern hyperscan can approximate in prefilter mode (a superset of its
        # matches, e.g. with back references ignored) only runs when that approximation matched: same hits,
        # fewer calls on the budget.
        self.gate: hyperscan.Database | None = None
        self.gated: frozenset[int] = frozenset()
        pre = [(k, _hs_prefilter_pattern(by_index[idx])) for k, (idx, engine, _) in enumerate(self.fallback)
               if engine == _BT]
        pre_ok = [(k, p) for k, p in pre if p is not None and _hs_single_ok(p[0], p[1])]
        if pre_ok:
            self.gate = _hs_try([p[0] for _, p in pre_ok], [k for k, _ in pre_ok], [p[1] for _, p in pre_ok])
            if self.gate is not None:
                self.gated = frozenset(k for k, _ in pre_ok)
        # What an empty text matches (``/^\s*$/`` does) is fixed: found once here, so evaluation skips the scans
        # of the many header targets a message lacks.
        probe = bytearray(len(rules))
        self.match(b"", probe, _Budget(1.0))
        self.empty_hits: tuple[int, ...] = tuple(i for i, v in enumerate(probe) if v)

    def scratch(self) -> hyperscan.Scratch:
        s = getattr(self._local, "scratch", None)
        if s is None:
            s = hyperscan.Scratch(self.db)
            self._local.scratch = s
        return s

    def gate_scratch(self) -> hyperscan.Scratch:
        s = getattr(self._local, "gate_scratch", None)
        if s is None:
            s = hyperscan.Scratch(self.gate)
            self._local.gate_scratch = s
        return s

    def match(self, data: bytes, hits: bytearray, budget: _Budget) -> None:
        """Set ``hits[i] = 1`` for every rule ``i`` of this group whose pattern matches ``data``."""
        if self.db is not None:
            self.db.scan(data, match_event_handler=_ON_MATCH, context=hits, scratch=self.scratch())
        if not self.fallback:
            return
        passed = bytearray(len(self.fallback))
        if self.gate is not None:
            self.gate.scan(data, match_event_handler=_ON_MATCH, context=passed, scratch=self.gate_scratch())
        gated = self.gated
        for k, (idx, engine, rx) in enumerate(self.fallback):
            if engine == _RE2:
                if rx.search(data) is not None:
                    hits[idx] = 1
                continue
            if not passed[k] and k in gated:
                continue
            if budget.left <= 0.0:
                budget.timed_out.append(idx)
                continue
            t0 = time.thread_time()
            try:
                if rx.search(data, timeout=budget.left) is not None:
                    hits[idx] = 1
            except TimeoutError:
                budget.timed_out.append(idx)
            finally:
                budget.left -= time.thread_time() - t0


def _on_match(pid: int, start: int, end: int, flags: int, hits: bytearray) -> None:
    """hyperscan match callback (one per pattern: HS_FLAG_SINGLEMATCH); the context is the hit vector."""
    hits[pid] = 1


# hyperscan types the callback's context as object: it hands back the bytearray each scan above passes
_ON_MATCH = cast("Callable[[int, int, int, int, object], None]", _on_match)


_HS_UNSUPPORTED_RE = re.compile(r"\(\?<?[=!]|\\[1-9]|\(\?P=|\(\?>|\\[AzZGbB]?[kK]<|\(\?\(|\(\?[a-zA-Z]*x|\\[pP]\{")


_BIG_REPEAT_RE = re.compile(r"\{\d*,?(\d{3,})\}")
_HS_MAX_REPEAT = 100
_HS_MAX_LEN = 4000
_GROUP_REPEAT_RE = re.compile(r"\)\{(?:[3-9]|\d\d)")
_GROUP_REPEAT_MIN_LEN = 200  # a short pattern may repeat a group; long ones explode  # larger bounded repeats make hyperscan's compile explode; ``re`` copes


def _hs_pattern(spec: _Spec) -> tuple[bytes, int] | None:
    """hyperscan expression and flags for a spec, or None when it must use ``re``.

    Byte mode (no HS_FLAG_UTF8): the same semantics as the ``re`` fallback on UTF-8 bytes,
    and far cheaper to compile for the big character-class alternations of imported rules."""
    spec = _plain(spec)
    if _HS_UNSUPPORTED_RE.search(spec.regex) is not None:
        return None
    if any(int(m.group(1)) > _HS_MAX_REPEAT for m in _BIG_REPEAT_RE.finditer(spec.regex)):
        return None
    # repeated big groups: minutes of hyperscan compile, microseconds in ``re``
    return _hs_expression(spec, hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_ALLOWEMPTY)


def _hs_prefilter_pattern(spec: _Spec) -> tuple[bytes, int] | None:
    """hyperscan prefilter-mode expression for a pattern that uses constructs hyperscan lacks (back references,
    look-arounds, ...), or None. Prefilter mode matches a superset of the pattern's matches, so it can only rule a
    text out."""
    spec = _plain(spec)
    if _HS_UNSUPPORTED_RE.search(spec.regex) is None:
        return None
    # (bounded repeats are fine: prefilter mode may widen them)
    return _hs_expression(
        spec, hyperscan.HS_FLAG_PREFILTER | hyperscan.HS_FLAG_SINGLEMATCH | hyperscan.HS_FLAG_ALLOWEMPTY
    )


def _hs_expression(spec: _Spec, flags: int) -> tuple[bytes, int] | None:
    """The hyperscan (expression, flags) of ``spec`` on top of ``flags``, or None where hyperscan should not take
    it: too long, big repeated groups (minutes of compile), or text it cannot encode."""
    if len(spec.regex) > _HS_MAX_LEN or (
        len(spec.regex) > _GROUP_REPEAT_MIN_LEN and _GROUP_REPEAT_RE.search(spec.regex) is not None
    ):
        return None
    for ch in spec.flags:
        flags |= _HS_FLAGS.get(ch, 0)
    if spec.target == "uri":
        flags |= hyperscan.HS_FLAG_MULTILINE
    try:
        return _utf8_escapes(spec.regex).encode("utf-8"), flags
    except UnicodeEncodeError:
        return None


_HS_SINGLE: dict[tuple[bytes, int], bool] = {}
_HS_CACHE: dict[tuple[tuple[bytes, ...], tuple[int, ...], tuple[int, ...]], hyperscan.Database | None] = {}
_HS_LOCK = threading.Lock()


def _hs_try(exprs: list[bytes], ids: list[int], flags: list[int]) -> hyperscan.Database | None:
    """Compile a database (memoised: engines rebuilt after a rule change reuse it)."""
    key = (tuple(exprs), tuple(ids), tuple(flags))
    with _HS_LOCK:
        if key in _HS_CACHE:
            return _HS_CACHE[key]
    try:
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        db.compile(expressions=list(exprs), ids=list(ids), flags=list(flags))
    except hyperscan.error:
        db = None
    with _HS_LOCK:
        if len(_HS_CACHE) > 256:  # two rule sets the size of SpamAssassin's (116 targets) stay compiled
            _HS_CACHE.clear()
        _HS_CACHE[key] = db
    return db


def _hs_single_ok(expr: bytes, flag: int) -> bool:
    key = (expr, flag)
    ok = _HS_SINGLE.get(key)
    if ok is None:
        try:
            hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK).compile(expressions=[expr], ids=[0], flags=[flag])
            ok = True
        except hyperscan.error:
            ok = False
        if len(_HS_SINGLE) < 100_000:
            _HS_SINGLE[key] = ok
    return ok
