"""Parse raw RFC 822 / MIME mail into the normalised view that rules and features read.

Spam is adversarial input: broken MIME, lying charsets, base64 junk, hidden HTML text,
zero-width characters and look-alike letters are all common. ``parse`` therefore never
raises; it returns the best parse it can plus *defect flags* that are themselves strong
signals for the rules and the learned models. Only the first ``max_bytes`` bytes are
analysed, so a 50 MB message costs what a 256 KB one does.

Speed matters (the whole per-message pipeline has a budget of ~400 us). Well-formed
messages (the vast majority) are split into the *same* ``compat32`` ``Message`` tree the
stdlib feedparser would build by a small header/boundary splitter (``_fast_tree``) at a
fraction of the cost; anything it is not sure of (a defect the feedparser would record,
``message/*`` parts, lone CRs ...) goes through the stdlib ``email`` feedparser. Both paths
feed one shared part walker, so a message yields the same ``ParsedMessage`` either way.
Decoding is done here with ``binascii``; HTML is rendered with selectolax's lexbor backend.

The modules, in the order they build on each other:

- ``view``: ``ParsedMessage``, ``DEFAULT_MAX_BYTES`` and the caps on hostile structure;
- ``normalize``: ``normalize_text`` (invisible characters, look-alike letters);
- ``decode``: charsets, transfer encodings, header values and RFC 2047 encoded words;
- ``html``: HTML rendered to visible text, within a budget of parser work;
- ``urls``: URLs and their domains;
- ``auth``: trusted SPF, DKIM and DMARC outcomes (``authentication_results``);
- ``parsing``: ``parse``, the fast splitter and the part walker.
"""

from __future__ import annotations

from models.message.auth import authentication_results, configure_trusted_authserv_ids
from models.message.normalize import normalize_text
from models.message.parsing import _sender_address as _sender_address  # models.userlists reads senders alike
from models.message.parsing import parse
from models.message.view import DEFAULT_MAX_BYTES, ParsedMessage

__all__ = [
    "DEFAULT_MAX_BYTES",
    "ParsedMessage",
    "authentication_results",
    "configure_trusted_authserv_ids",
    "normalize_text",
    "parse",
]
