"""The parsed view of a message (``ParsedMessage``), how much of a message is analysed (``DEFAULT_MAX_BYTES``), and
the caps that bound the work hostile structure can cause.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_BYTES = 262_144

# Caps. Real mail stays far below each of them (the public corpus's largest figure is in brackets); a
# message that reaches one is cut back *before* the step whose cost it would blow up, and the cap is
# recorded as a defect ("<what>_capped"): hostile structure is itself evidence for the rules and models.
_MAX_PARTS = 200  # parts walked per message; more: "too_many_parts"
_PARTS_BASE, _BYTES_PER_PART = 16, 512  # ... and no more than this many for a message's size [4 in 2 KB]
_MAX_URLS = 500  # URLs kept [500]; more: "urls_capped"
_MAX_MIME_DECLS = 16  # multipart/ and message/ Content-Types [4]: bounds the nesting depth
_MAX_BOUNDARY_LINES = 256  # lines starting "--": bounds the parts either MIME parser builds
_BOUNDARY_LINES_BASE = 32  # ... and no more than 32 + one per 512 bytes [16 in 5.6 KB]
_MAX_MIME_CT_CHARS = 1024  # a multipart/ or message/ Content-Type value [127]: the stdlib's parameter
#                            parser is quadratic in it, and both MIME parsers call it for a boundary
_MAX_STDLIB_WORK = 16_384  # lines x (1 + declarations) the stdlib feedparser is given [6,888]: it spends
#                            a Python step per line and per open multipart on every line
_MAX_HEADERS = 1000  # header fields kept [125]
_MAX_HEADER_CHARS = 32_768  # characters of one header value kept [14,286]
_MAX_ADDRESS_CHARS = 1024  # of a From value handed to the address parser (pure Python) [144]
_MAX_PARAM_CHARS = 4096  # a part's Content-Type/-Disposition read for a file name (quadratic parser)
_MAX_ENCODED_WORDS = 256  # RFC 2047 words decoded in one header value [54 in a whole message] ...
_ENCODED_WORDS_BASE, _BYTES_PER_ENCODED_WORD = 256, 128  # ... and in a message: 256 + one per 128 bytes


@dataclass(slots=True)
class ParsedMessage:
    """What the rules and the features see of one message.

    ``headers`` keeps wire order with lower-case names and decoded, normalised values;
    ``body_text`` is the visible text (HTML rendered, hidden text dropped); ``raw_body``
    is the decoded parts with HTML markup kept; ``raw`` is the analysed (capped) bytes.
    """

    headers: list[tuple[str, str]] = field(default_factory=list)
    subject: str = ""
    sender: str = ""
    body_text: str = ""
    raw_body: str = ""
    urls: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    attachments: list[tuple[str, str]] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)
    size: int = 0
    truncated: bool = False
    raw: bytes = b""
    content_types: list[str] = field(default_factory=list)
    html_parts: int = 0
    text_parts: int = 0
    auth: list[str] = field(default_factory=list)  # "spf=fail", "dkim=pass", ...: trusted headers only

    def header(self, name: str) -> str:
        """All values of header ``name`` (case-insensitive) joined by newlines; "" if absent."""
        key = name.lower()
        return "\n".join(v for k, v in self.headers if k == key)

    def has_header(self, name: str) -> bool:
        key = name.lower()
        return any(k == key for k, _ in self.headers)
