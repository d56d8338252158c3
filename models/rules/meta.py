"""Meta expressions: tokenize -> Pratt parse -> closures.

A meta rule's pattern is a boolean/arithmetic expression over other rules (``A && (B || !C)``, ``(A + B + C) >= 2``),
parsed into closures over the hit vector (never ``eval``), within limits on its size and depth.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from models.rules.model import RuleError, RuleRefused

_TOKEN_RE = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|([A-Za-z_][A-Za-z0-9_]*)|(&&|\|\||>=|<=|==|!=|[-+*/()!<>]))")
_BINARY = {
    "||": (1, lambda a, b: 1 if (a or b) else 0),
    "&&": (2, lambda a, b: 1 if (a and b) else 0),
    "==": (3, lambda a, b: 1 if a == b else 0),
    "!=": (3, lambda a, b: 1 if a != b else 0),
    "<": (4, lambda a, b: 1 if a < b else 0),
    ">": (4, lambda a, b: 1 if a > b else 0),
    "<=": (4, lambda a, b: 1 if a <= b else 0),
    ">=": (4, lambda a, b: 1 if a >= b else 0),
    "+": (5, lambda a, b: a + b),
    "-": (5, lambda a, b: a - b),
    "*": (6, lambda a, b: a * b),
    "/": (6, lambda a, b: a / b if b else 0),
}

Evaluator = Callable[[Sequence[float]], float]


def _tokenize(expr: str) -> list[tuple[str, str]]:
    pos, out = 0, []
    expr = expr.rstrip()
    while pos < len(expr):
        m = _TOKEN_RE.match(expr, pos)
        if m is None or m.end() == pos:
            raise RuleError(f"unexpected character {expr[pos:pos + 10]!r}")
        num, ident, op = m.groups()
        if num is not None:
            out.append(("num", num))
        elif ident is not None:
            out.append(("id", ident))
        else:
            out.append(("op", op))
        pos = m.end()
    return out


#: Limits of one meta expression. A flat chain of thousands of terms, or parentheses nested hundreds deep, is
#: refused: evaluating it would recurse past Python's stack on every message. [SpamAssassin's largest: 122
#: terms, 1,786 characters, parentheses 3 deep.]
MAX_META_TERMS = 512
MAX_META_CHARS = 16_384
MAX_META_DEPTH = 64  # nested operators and parentheses, as parse levels
_CHAINS = ("&&", "||", "+")  # associative: a run of one of them is evaluated as one flat loop


class _MetaParser:
    def __init__(self, expr: str, resolve: Callable[[str], int]) -> None:
        if len(expr) <= 16 * MAX_META_CHARS:  # (a larger one is not even tokenized)
            self.toks = _tokenize(expr)
            terms = sum(1 for kind, _ in self.toks if kind != "op")
            if terms > MAX_META_TERMS:
                raise RuleRefused(f"expression of {terms} terms (at most {MAX_META_TERMS})")
        if len(expr) > MAX_META_CHARS:
            raise RuleRefused(f"expression of {len(expr)} characters (at most {MAX_META_CHARS})")
        self.i = 0
        self.depth = 0
        self.resolve = resolve
        self.refs: set[str] = set()

    def parse(self) -> Evaluator:
        if not self.toks:
            raise RuleError("empty expression")
        fn = self._expr(0)
        if self.i != len(self.toks):
            raise RuleError(f"unexpected {self.toks[self.i][1]!r}")
        return fn

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_META_DEPTH:
            raise RuleRefused(f"expression nested deeper than {MAX_META_DEPTH} levels")

    def _expr(self, min_prec: int) -> Evaluator:
        self._enter()
        left = self._unary()
        chain_op: str | None = None
        chain: list[Evaluator] = []
        while self.i < len(self.toks):
            kind, val = self.toks[self.i]
            if kind != "op" or val not in _BINARY:
                break
            prec, op = _BINARY[val]
            if prec < min_prec:
                break
            self.i += 1
            right = self._expr(prec + 1)
            if val == chain_op:
                chain.append(right)
                continue
            if chain_op is not None:
                left = _chain(chain_op, chain)
                chain_op = None
            if val in _CHAINS:
                chain_op, chain = val, [left, right]
            else:
                left = _combine(val, op, left, right)
        if chain_op is not None:
            left = _chain(chain_op, chain)
        self.depth -= 1
        return left

    def _unary(self) -> Evaluator:
        if self.i >= len(self.toks):
            raise RuleError("expression ends early")
        self._enter()
        try:
            return self._unary_inner()
        finally:
            self.depth -= 1

    def _unary_inner(self) -> Evaluator:
        kind, val = self.toks[self.i]
        self.i += 1
        if kind == "num":
            num = float(val)
            return lambda h: num
        if kind == "id":
            idx = self.resolve(val)
            self.refs.add(val)
            return lambda h: h[idx]
        if val == "!":
            if self.i < len(self.toks) and self.toks[self.i][0] == "id":  # !NAME: one closure, not two
                name = self.toks[self.i][1]
                self.i += 1
                j = self.resolve(name)
                self.refs.add(name)
                return lambda h: 0 if h[j] else 1
            inner = self._unary()
            return lambda h: 0 if inner(h) else 1
        if val == "-":
            inner = self._unary()
            return lambda h: -inner(h)
        if val == "(":
            inner = self._expr(0)
            if self.i >= len(self.toks) or self.toks[self.i] != ("op", ")"):
                raise RuleError("missing ')'")
            self.i += 1
            return inner
        raise RuleError(f"unexpected {val!r}")


def _combine(op_name: str, op: Callable[[float, float], float], left: Evaluator, right: Evaluator) -> Evaluator:
    """The closure of ``left <op> right``. ``&&`` and ``||`` skip the right side when the left decides (operands
    have no side effects, so the value is the one ``op`` gives) and save a call level."""
    if op_name == "&&":
        return lambda h: 1 if (left(h) and right(h)) else 0
    if op_name == "||":
        return lambda h: 1 if (left(h) or right(h)) else 0
    return lambda h: op(left(h), right(h))


def _chain(op_name: str, operands: list[Evaluator]) -> Evaluator:
    """``a op b op c ...`` (left to right, as the nested form gives) as one closure over the list: one call
    level whatever the length."""
    if len(operands) == 2:
        return _combine(op_name, _BINARY[op_name][1], operands[0], operands[1])
    fs = tuple(operands)
    if op_name == "&&":

        def all_of(h: Sequence[float]) -> float:
            for f in fs:
                if not f(h):
                    return 0
            return 1

        return all_of
    if op_name == "||":

        def any_of(h: Sequence[float]) -> float:
            for f in fs:
                if f(h):
                    return 1
            return 0

        return any_of
    first, rest = fs[0], fs[1:]

    def total(h: Sequence[float]) -> float:
        v = first(h)
        for f in rest:
            v = v + f(h)
        return v

    return total


def _never(h: Sequence[float]) -> float:
    """The evaluator of a refused meta rule."""
    return 0


def meta_references(expr: str) -> set[str]:
    """Rule names an expression refers to (for dependency checks and import)."""
    return {v for k, v in _tokenize(expr) if k == "id"}
