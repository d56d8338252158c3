"""The one feature pipeline shared by training and serving.

Every learned model sees a message as a bag of hashed tokens: words of the subject and the visible body, URL
hosts, the sender's domain, a few header tokens (mailer, content types, charsets, which headers are present and
in which order), parse defects, rule hits ("rule:NAME") and coarse numeric bins (size, HTML share, capitals,
URL count), plus adjacent body-word pairs. Tokens are hashed with CRC-32 (stable across processes and machines,
unlike Python's ``hash``; word pairs are mixed from their two words' CRCs) into ``n_buckets`` ids; the value of
a token is ``log1p(count)`` and every row is L2-normalised. Because rule hits
are tokens, adding or disabling a rule never changes the model's input shape.

Collection artefacts of the public corpus (the anonymised recipients, the collector's own domains and lists,
``Received`` chains, replayed 2002 dates, the collector's own SpamAssassin headers) are left out unless
``FeatureConfig.include_artefacts`` is set, so the evaluation can show the models do not lean on them.

The output is a :class:`FeatureBatch` in coordinate form (ids, vals, seg = row of each entry, rows): the
exact inputs of both ONNX graphs.
"""

from __future__ import annotations

import re
import zlib
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from itertools import islice, pairwise
from typing import Any, Protocol

import numpy as np

__all__ = [
    "ARTEFACT_HEADERS",
    "FeatureBatch",
    "FeatureConfig",
    "featurize",
    "message_tokens",
    "token_id",
]

#: Headers whose contents are collection artefacts in the public corpus (recipients were anonymised, the
#: Received chains and dates are the collector's own, X-Spam-* were added by the collector's SpamAssassin).
ARTEFACT_HEADERS: frozenset[str] = frozenset(
    {
        "to",
        "cc",
        "bcc",
        "delivered-to",
        "x-original-to",
        "envelope-to",
        "received",
        "date",
        "return-path",
        "x-spam-status",
        "x-spam-level",
        "x-spam-checker-version",
        "x-spam-flag",
        "x-spam-report",
        "x-spam-score",
        "x-spam-tests",
        "x-spam-prev-content-type",
        "x-spam-prev-content-transfer-encoding",
        "status",
        "x-status",
        "x-keywords",
        "x-uid",
        "content-length",
        "lines",
        "x-from_",
    }
)

#: The collector's own domains, anonymised mailboxes and lists: removed from every text when artefacts are off.
#: The pattern starts with literals so a scan costs a few microseconds (a leading ``[\w.]*`` made it 100x slower).
_ARTEFACT_TEXT = re.compile(
    r"(?:spamassassin\.taint|taint|jmason|netnoteinc|slashnull|example)\.(?:org|com)"
    r"|localhost\.localdomain|zzzz[\w.+-]*|yyyy[\w.+-]*"
)  # applied to lower-cased text only (IGNORECASE made every scan several times slower)

# Words of up to 24 characters (longer runs are cut into pieces by the regex itself, no per-word Python step);
# inner dots, dashes and apostrophes kept ("e-mail", "don't", "v1.2"), runs of "$" and "!" are tokens too.
_WORD_RE = r"\w[\w'.\-]{0,22}\w|\w|[$€£¥!]+"
_WORD = re.compile(_WORD_RE)
# The same pattern for pure-ASCII text (most mail): there Unicode ``\w`` and ASCII ``\w`` are the same class, and
# the ASCII table test makes the scan about a quarter cheaper than the Unicode database lookup.
_WORD_ASCII = re.compile(_WORD_RE, re.ASCII)
# ... and on the ASCII bytes of such text, whose matches are the UTF-8 bytes CRC-32 wants (no per-word encode).
_WORD_BYTES = re.compile(rb"\w[\w'.\-]{0,22}\w|\w|[$!]+")
# Cheap guards before the artefact regex: substring tests run at memchr speed, the regex does not.
_UPPER = bytes(range(ord("A"), ord("Z") + 1))
_HEADER_VALUE_TOKEN = re.compile(r"[a-z][a-z0-9]*(?:[.\-/][a-z0-9]+)*")
#: Headers whose values give tokens, by how (all other headers give their name and position only).
_VALUE_HEADERS: dict[str, str] = {
    **dict.fromkeys(("x-mailer", "user-agent", "x-mimeole", "x-msmail-priority", "x-priority", "precedence"), "mailer"),
    "content-type": "content-type",
    "content-transfer-encoding": "content-transfer-encoding",
    "message-id": "message-id",
    "received": "artefact",
    "date": "artefact",
}
_CHARSET = re.compile(r'(?i)charset\s*=\s*"?([\w.:\-]+)')
_DIGITS = re.compile(r"\d+")
# Bounded work per message whatever the parser let through: the body is cut at ``body_max_chars``; the subject
# at this many characters [the corpus's longest: 710], header value tokens at a few per header.
_SUBJECT_MAX_CHARS = 2048
_MAX_CHARSET_TOKENS = 8


class _Message(Protocol):
    """What features read from ``models.message.ParsedMessage`` (kept structural so tests can fake it)."""

    headers: list[tuple[str, str]]
    subject: str
    sender: str
    body_text: str
    urls: list[str]
    domains: list[str]
    attachments: list[tuple[str, str]]
    defects: list[str]
    size: int


class _Hit(Protocol):
    @property
    def name(self) -> str: ...


class _RuleResult(Protocol):
    @property
    def hits(self) -> Sequence[_Hit]: ...


@dataclass(slots=True)
class FeatureConfig:
    """How messages become hashed tokens; stored next to every model (features.json) so serving matches."""

    n_buckets: int = 1 << 18
    body_max_chars: int = 8_000
    body_bigrams: bool = True
    subject_bigrams: bool = True
    header_tokens: bool = True
    header_order: bool = True
    url_tokens: bool = True
    numeric_bins: bool = True
    rule_tokens: bool = True
    include_artefacts: bool = False
    version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureConfig:
        """Build from a stored dict; unknown keys are refused so a newer, incompatible config fails loudly."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown FeatureConfig keys: {sorted(unknown)}")
        cfg = cls(**data)
        if cfg.n_buckets < 2 or cfg.n_buckets > (1 << 31):
            raise ValueError(f"n_buckets out of range: {cfg.n_buckets}")
        return cfg


@dataclass(slots=True)
class FeatureBatch:
    """A batch of rows in coordinate form: entry k is token ``ids[k]`` with value ``vals[k]`` in row ``seg[k]``."""

    ids: np.ndarray  # int64[N]
    vals: np.ndarray  # float32[N]
    seg: np.ndarray  # int64[N], non-decreasing
    rows: int

    def row(self, i: int) -> FeatureBatch:
        """Row ``i`` alone (a one-row batch); used by the incremental learner and the parity tests."""
        lo, hi = np.searchsorted(self.seg, [i, i + 1])
        return FeatureBatch(self.ids[lo:hi], self.vals[lo:hi], np.zeros(hi - lo, dtype=np.int64), 1)

    def take(self, index: Sequence[int] | np.ndarray) -> FeatureBatch:
        """The rows ``index`` in that order, as a new batch (for train/validation splits)."""
        starts = np.searchsorted(self.seg, np.arange(self.rows + 1))
        parts_i, parts_v, parts_s = [], [], []
        for new, old in enumerate(np.asarray(index, dtype=np.int64)):
            lo, hi = starts[old], starts[old + 1]
            parts_i.append(self.ids[lo:hi])
            parts_v.append(self.vals[lo:hi])
            parts_s.append(np.full(hi - lo, new, dtype=np.int64))
        if not parts_i:
            return FeatureBatch(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64), 0)
        return FeatureBatch(np.concatenate(parts_i), np.concatenate(parts_v), np.concatenate(parts_s), len(parts_i))

    def to_csr(self, n_buckets: int) -> Any:
        """scipy CSR matrix [rows, n_buckets] (what scikit-learn trains on)."""
        from scipy.sparse import csr_matrix

        indptr = np.searchsorted(self.seg, np.arange(self.rows + 1)).astype(np.int64)
        return csr_matrix((self.vals, self.ids, indptr), shape=(self.rows, n_buckets))

    def onnx_inputs(self) -> dict[str, np.ndarray]:
        """The feed of both ONNX graphs (ids, vals, seg, rows)."""
        return {
            "ids": np.ascontiguousarray(self.ids, dtype=np.int64),
            "vals": np.ascontiguousarray(self.vals, dtype=np.float32),
            "seg": np.ascontiguousarray(self.seg, dtype=np.int64),
            "rows": np.array([self.rows], dtype=np.int64),
        }

    @staticmethod
    def concat(batches: Sequence[FeatureBatch]) -> FeatureBatch:
        """Stack batches row-wise."""
        ids, vals, seg, off = [], [], [], 0
        for b in batches:
            ids.append(b.ids)
            vals.append(b.vals)
            seg.append(b.seg + off)
            off += b.rows
        if not ids:
            return FeatureBatch(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64), 0)
        return FeatureBatch(np.concatenate(ids), np.concatenate(vals), np.concatenate(seg), off)


# Token -> bucket: CRC-32 of the UTF-8 bytes, stable across processes and machines (Python's ``hash`` is salted).
# Hashing directly beats a token -> CRC cache: tokens are fresh strings, so a cache pays for ``hash(str)`` and a
# cache-missing lookup in a large dict, which costs more than CRC-32 of a few bytes.
_crc32 = zlib.crc32


def token_id(token: str, n_buckets: int) -> int:
    """The bucket of one token (CRC-32 of its UTF-8 bytes modulo ``n_buckets``)."""
    return _crc32(token.encode("utf-8", "surrogatepass")) % n_buckets


def _bin(value: float, edges: Sequence[float]) -> int:
    return bisect_right(edges, value)


_SIZE_EDGES = (500, 1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000)
_RATIO_EDGES = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75)
_COUNT_EDGES = (1, 2, 3, 5, 8, 13, 21, 50)


def _has_artefact(t: str) -> bool:
    """Substring tests (memchr speed) before any regex; ``t`` is lower-case."""
    return (
        "taint" in t
        or "jmason" in t
        or "netnoteinc" in t
        or "slashnull" in t
        or "example." in t
        or "zzzz" in t
        or "yyyy" in t
        or "localdomain" in t
    )


def _words(text: str) -> list[str]:
    """``_WORD.findall(text)``, through the cheaper ASCII scan when ``text`` is ASCII (identical result)."""
    return (_WORD_ASCII if text.isascii() else _WORD).findall(text)


def _strip_artefacts(text_lower: str) -> str:
    if _has_artefact(text_lower):
        return _ARTEFACT_TEXT.sub(" ", text_lower)
    return text_lower


def _host_tokens(prefix: str, host: str, out: list[str]) -> None:
    host = host.strip(".").lower()
    if not host:
        return
    out.append(prefix + host)
    labels = host.split(".")
    if len(labels) > 2:
        out.append(prefix + "." + ".".join(labels[-2:]))
    out.append(prefix + "tld." + labels[-1])


def message_tokens(msg: _Message, result: _RuleResult | None, config: FeatureConfig) -> list[str]:
    """The token strings of one message (before hashing), body bigrams spelled "a b"; for inspection and tests.

    Body bigrams are hashed from their two words' hashes (:func:`_bigram_ids`), not from these strings.
    """
    toks, body = _parts(msg, result, config)
    words = _words(body)
    bigrams = [a + " " + b for a, b in pairwise(words)] if config.body_bigrams else []
    return toks + words + bigrams


def _parts(msg: _Message, result: _RuleResult | None, config: FeatureConfig) -> tuple[list[str], str]:
    """(every token but the body words, the lower-cased body text the words are taken from)."""
    artefacts = config.include_artefacts
    toks: list[str] = []

    subject = (msg.subject or "")[:_SUBJECT_MAX_CHARS]
    body_orig = (msg.body_text or "")[: config.body_max_chars]
    subject_low = subject.lower()
    body = body_orig.lower()
    if not artefacts:
        subject_low = _strip_artefacts(subject_low)
        body = _strip_artefacts(body)
    low = _words(subject_low)
    nsubj = len(low)  # the subject's word count, binned below
    toks.extend(["s:" + w for w in low])
    if not subject.islower():  # an all-capitals word needs a cased character that is not lower case
        toks.extend(["S:" + w.lower() for w in _words(subject) if len(w) > 1 and w.isupper()])
    if config.subject_bigrams and len(low) > 1:
        toks.extend(["s2:" + a + " " + b for a, b in pairwise(low)])

    if config.url_tokens:
        for host in msg.domains:
            if not artefacts and _has_artefact(host.lower()):
                continue
            _host_tokens("u:", host, toks)
        toks.extend(["ucount:" + str(_bin(len(msg.urls), _COUNT_EDGES))])

    sender = (msg.sender or "").lower()
    if sender and (artefacts or not _has_artefact(sender)):
        local, _, domain = sender.rpartition("@")
        if domain:
            _host_tokens("f:", domain, toks)
        toks.append("fl:" + _DIGITS.sub("9", local)[:20])
    elif not sender:
        toks.append("f:none")

    if config.header_tokens:
        prev = "^"
        for name, value in msg.headers:
            if " " in name or (not artefacts and name in ARTEFACT_HEADERS):
                continue
            toks.append("hn:" + name)
            if config.header_order:
                toks.append("ho:" + prev + ">" + name)
                prev = name
            kind = _VALUE_HEADERS.get(name)
            if kind is None:  # most headers: name and order only, no value tokens
                continue
            vlow = value.lower()
            if kind == "mailer":
                toks.extend(["hv:" + name + ":" + m.group() for m in islice(_HEADER_VALUE_TOKEN.finditer(vlow), 8)])
            elif kind == "content-type":
                toks.append("ct:" + vlow.split(";", 1)[0].strip())
                for m in islice(_CHARSET.finditer(vlow), _MAX_CHARSET_TOKENS):
                    toks.append("cs:" + m.group(1))
            elif kind == "content-transfer-encoding":
                toks.append("cte:" + vlow.strip())
            elif kind == "message-id":
                at = vlow.rfind("@")
                shape = _DIGITS.sub("9", vlow[:at] if at > 0 else vlow)[:16]
                toks.append("mid:" + shape)
                if at > 0 and (artefacts or not _has_artefact(vlow)):
                    toks.append("midd:" + vlow[at + 1 :].rstrip(">").strip())
            elif artefacts:  # kind == "artefact": received, date
                toks.extend(["hv:" + name + ":" + m.group() for m in islice(_HEADER_VALUE_TOKEN.finditer(vlow), 12)])
        toks.append("ho:" + prev + ">$")
        for fname, ctype in msg.attachments:
            toks.append("att:" + (ctype or "").lower())
            ext = fname.rpartition(".")[2].lower() if "." in fname else ""
            toks.append("atx:" + ext[:8])

    toks.extend(["d:" + d for d in msg.defects])
    auth = getattr(msg, "auth", None)  # SPF/DKIM/DMARC outcomes from the operator's own hosts (models/message/)
    if auth:
        toks.extend(["auth:" + a for a in auth])

    if config.rule_tokens and result is not None:
        toks.extend(["rule:" + h.name for h in result.hits])

    if config.numeric_bins:
        toks.append("n:size" + str(_bin(msg.size, _SIZE_EDGES)))
        toks.append("n:blen" + str(_bin(len(body), _SIZE_EDGES)))
        ascii_body = body_orig.encode("ascii", "ignore")
        letters = len(ascii_body)
        caps = letters - len(ascii_body.translate(None, _UPPER))
        toks.append("n:caps" + str(_bin(caps / letters if letters else 0.0, _RATIO_EDGES)))
        toks.append("n:nonascii" + str(_bin(1.0 - len(ascii_body) / len(body) if body else 0.0, _RATIO_EDGES)))
        raw_len = len(getattr(msg, "raw_body", "") or "")
        toks.append("n:html" + str(_bin(1.0 - len(body) / raw_len if raw_len > len(body) else 0.0, _RATIO_EDGES)))
        toks.append("n:nsubj" + str(_bin(nsubj, _COUNT_EDGES)))
    return toks, body


def _token_crcs(tokens: list[str]) -> list[int]:
    """CRC-32 of each token's UTF-8 bytes."""
    return [_crc32(t.encode("utf-8", "surrogatepass")) for t in tokens]


def _word_crcs(body: str) -> list[int]:
    """CRC-32 of each body word, in order: ``_token_crcs(_words(body))``, with ASCII text scanned as bytes."""
    if body.isascii():
        return list(map(_crc32, _WORD_BYTES.findall(body.encode("ascii"))))
    return _token_crcs(_WORD.findall(body))


_BIGRAM_MUL = np.uint64(0x01000193)
_BIGRAM_SALT = np.uint64(0x9E3779B9)
_U32 = np.uint64(0xFFFFFFFF)


def _bigram_ids(word_hashes: np.ndarray) -> np.ndarray:
    """Hashes of adjacent word pairs from the words' own hashes (vectorised; no "a b" strings are built)."""
    return ((word_hashes[:-1] * _BIGRAM_MUL) ^ (word_hashes[1:] + _BIGRAM_SALT)) & _U32


def _row(msg: _Message, result: _RuleResult | None, config: FeatureConfig) -> tuple[np.ndarray, np.ndarray]:
    """Distinct bucket ids of one message (ascending, int64) and their counts (float64).

    One uint64 array holds the token hashes then the word hashes (one conversion from Python ints); the sort and
    run-length count are what ``np.unique(..., return_counts=True)`` does, without its generic overhead.
    """
    toks, body = _parts(msg, result, config)
    crcs = _token_crcs(toks)
    n_toks = len(crcs)
    crcs += _word_crcs(body)
    allh = np.fromiter(crcs, dtype=np.uint64, count=len(crcs))
    if config.body_bigrams and len(crcs) - n_toks > 1:
        allh = np.concatenate((allh, _bigram_ids(allh[n_toks:])))
    allh %= np.uint64(config.n_buckets)
    allh.sort()
    n = allh.size
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(allh[1:], allh[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    bounds = np.empty(starts.size + 1, dtype=np.int64)
    bounds[:-1] = starts
    bounds[-1] = n
    counts = bounds[1:] - bounds[:-1]
    return allh[starts].astype(np.int64), counts.astype(np.float64)


def featurize(
    msgs: Sequence[_Message], rule_results: Sequence[_RuleResult | None], config: FeatureConfig
) -> FeatureBatch:
    """Hash every message into one batch; identical code for training, evaluation and serving."""
    if len(msgs) != len(rule_results):
        raise ValueError(f"{len(msgs)} messages but {len(rule_results)} rule results")
    if len(msgs) == 1:  # the serving path: one message, a handful of numpy calls
        i1, tf1 = _row(msgs[0], rule_results[0], config)
        v1 = np.log1p(tf1)
        n1 = float(np.sqrt(v1 @ v1)) or 1.0
        return FeatureBatch(i1, (v1 / n1).astype(np.float32), np.zeros(i1.size, dtype=np.int64), 1)
    ids: list[np.ndarray] = []
    tfs: list[np.ndarray] = []
    lens: list[int] = []
    for msg, res in zip(msgs, rule_results, strict=True):
        i, v = _row(msg, res, config)
        ids.append(i)
        tfs.append(v)
        lens.append(len(i))
    rows = len(lens)
    seg = np.repeat(np.arange(rows, dtype=np.int64), lens)
    ids_a = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    v = np.log1p(np.concatenate(tfs)) if tfs else np.zeros(0, dtype=np.float64)
    norms = np.sqrt(np.bincount(seg, weights=v * v, minlength=rows))
    norms[norms == 0] = 1.0
    vals_a = (v / norms[seg]).astype(np.float32)
    return FeatureBatch(ids_a, vals_a, seg, rows)
