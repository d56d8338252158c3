"""HTML rendered to the text a reader sees (hidden text dropped) with selectolax's lexbor backend, within a
per-message budget of parser work.
"""

from __future__ import annotations

import html as html_lib
import re

from selectolax.lexbor import LexborHTMLParser

# (The first-letter class rejects a "<" that starts no block tag before the alternation is tried: a run of
# "<" costs a sixth of what it did.)
_BLOCK_TAG_RE = re.compile(
    r"<(?=/?[abcdhlopstu])(?=/?(?:br|p|div|tr|td|th|li|ul|ol|table|h[1-6]|hr|blockquote|pre|title|center|dd|dt|section|article)\b)",
    re.IGNORECASE,
)
_HIDDEN_STYLE_RE = re.compile(
    r"display\s*:\s*none|visibility\s*:\s*hidden|font-size\s*:\s*(?:0|[01](?:\.\d+)?\s*(?:px|pt)|0*\.\d+\s*(?:em|rem))\b"
    r"|(?:^|;|\s)(?:max-)?(?:height|width)\s*:\s*0(?:px)?\s*(?:;|$)|opacity\s*:\s*0(?:\.0+)?\s*(?:;|$)",
    re.IGNORECASE,
)
_WHITE_RE = re.compile(r"^\s*(?:#?f{3}(?:f{3})?|white|rgb\(\s*255\s*,\s*255\s*,\s*255\s*\))\s*$", re.IGNORECASE)
_STYLE_COLOR_RE = re.compile(r"(?:^|;|\s)color\s*:\s*([^;]+)", re.IGNORECASE)
# Runs of blanks that need rewriting to one space: a single plain space (the common case) is
# left alone instead of being matched and replaced by itself.
_WS_RUN_RE = re.compile(r" [ \t\r\f\v\xa0]+|[\t\r\f\v\xa0][ \t\r\f\v\xa0]*")
_NL_SPLIT_RE = re.compile(r"\n\s*")


def _is_white(color: str | None) -> bool:
    return color is not None and _WHITE_RE.match(color) is not None


# The HTML parser's cost grows with the depth of the open elements at each tag (lexbor checks element
# scopes by walking that stack: 16,000 nested <div> cost 0.7 s), and every element with a style is then
# looked at in Python. So each message has a budget of parser work in proportion to its size: an estimate
# of the summed depth at each tag, and a number of tags. A part whose tag count squared fits the budget is
# charged that worst case without a scan; a larger one is scanned tag by tag, and what lies past the
# budget is rendered by a linear tag stripper ("html_capped"). [The corpus's largest: 27,343 units of
# work, 0.92 a byte; 2,299 tags, one per 17 bytes.]
_HTML_WORK_BASE, _HTML_WORK_PER_BYTE = 65_536, 8
_HTML_TAGS_BASE, _HTML_BYTES_PER_TAG = 1024, 16
_TAG_SCAN_RE = re.compile(r"<(/?)([A-Za-z][A-Za-z0-9]*)")
# elements that never stay open in a parse (void) or that the next sibling closes: no depth
_FLAT_ELEMENTS = frozenset(
    ["area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr", "p", "li", "td", "th", "tr", "option", "dt", "dd"]
)
_ANY_TAG_RE = re.compile(r"<[^<>]*>")


class HtmlBudget:
    """HTML parser work left to the parts of one message of ``size`` analysed bytes (see above)."""

    __slots__ = ("tags", "work")

    def __init__(self, size: int) -> None:
        self.work = _HTML_WORK_BASE + _HTML_WORK_PER_BYTE * size
        self.tags = _HTML_TAGS_BASE + size // _HTML_BYTES_PER_TAG


def _html_cut(html: str, budget: HtmlBudget) -> int:
    """How much of ``html`` the parser may take within ``budget`` (charged for it): all of it, or the
    offset of the first tag past the budget."""
    n_lt = html.count("<")
    if n_lt * n_lt <= budget.work and n_lt <= budget.tags:
        budget.work -= n_lt * n_lt
        budget.tags -= n_lt
        return len(html)
    depth = 0
    work, tags = budget.work, budget.tags
    cut = len(html)
    for m in _TAG_SCAN_RE.finditer(html):
        tags -= 1
        close, name = m.groups()
        if close:
            depth = depth - 1 if depth else 0
        elif name.lower() not in _FLAT_ELEMENTS:
            depth += 1
        work -= depth + 1
        if tags < 0 or work < 0:
            cut = m.start()
            break
    budget.work, budget.tags = max(0, work), max(0, tags)
    return cut


def _strip_markup(html: str) -> str:
    """Text of HTML by a linear tag stripper (what lies past the parser's budget): block tags become line
    breaks, other tags go, entities are decoded. No hidden-text detection."""
    return html_lib.unescape(_ANY_TAG_RE.sub("", _BLOCK_TAG_RE.sub("\n<", html)))


def html_to_text(html: str, defects: list[str], budget: HtmlBudget | None = None) -> str:
    """Visible text of an HTML part: no script/style/comments, no hidden elements.

    ``budget`` (one per message) bounds the HTML parser's work; without one the part gets a fresh one."""
    if "<" not in html:
        return html
    cut = _html_cut(html, budget if budget is not None else HtmlBudget(len(html)))
    rest = ""
    if cut < len(html):
        if "html_capped" not in defects:
            defects.append("html_capped")
        html, rest = html[:cut], _strip_markup(html[cut:])
    marked = _BLOCK_TAG_RE.sub("\n<", html)
    try:
        tree = LexborHTMLParser(marked)
    except Exception:  # noqa: BLE001 - markup the parser refuses is a defect, not a crash
        defects.append("bad_html")
        return html
    tree.strip_tags(["script", "style", "noscript", "template", "object", "applet", "head"])
    hidden = 0
    lowered_has = "style" in html or "hidden" in html or "color" in html or "STYLE" in html or "COLOR" in html
    for node in tree.css("[style], [hidden], font[color]") if lowered_has else ():
        attrs = node.attributes
        style = attrs.get("style") or ""
        if "hidden" in attrs or (style and _HIDDEN_STYLE_RE.search(style) is not None):
            hidden += 1
            node.decompose()
            continue
        color = attrs.get("color")
        if color is None and style:
            m = _STYLE_COLOR_RE.search(style)
            color = m.group(1) if m else None
        if _is_white(color):
            body = tree.body
            bg = (body.attributes.get("bgcolor") if body is not None else None) or ""
            if not bg or _is_white(bg):
                hidden += 1
                node.decompose()
    if hidden and "hidden_text" not in defects:
        defects.append("hidden_text")
    root = tree.body or tree.root
    text = root.text(separator="") if root is not None else ""
    title = tree.css_first("title") if ("<title" in html or "<TITLE" in html or "<Title" in html) else None
    if title is not None:
        text = title.text() + "\n" + text
    if rest:
        text += "\n" + rest
    text = _WS_RUN_RE.sub(" ", text)
    return _collapse_lines(text)


def _collapse_lines(text: str) -> str:
    """``re.sub(r"\\s*\n\\s*", "\n", text).strip()``: one newline between non-blank lines,
    no blanks around it. Splitting is ~3x faster than that substitution (every newline
    matched) on rendered HTML."""
    return "\n".join([seg for seg in [s.rstrip() for s in _NL_SPLIT_RE.split(text)] if seg]).strip()
