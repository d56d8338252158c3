"""Text normalisation: NFKC, invisible characters and look-alike letters, the tricks that split or disguise words
past filters ("V\u200bIAGRA").
"""

from __future__ import annotations

import re
import unicodedata

# Invisible / formatting characters used to split words past filters ("V\u200bIAGRA").
_INVISIBLE = [
    0x00AD, 0x034F, 0x061C, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180E, 0x3164, 0xFEFF, 0xFFA0,
    *range(0x200B, 0x2010),  # zero-width space/joiners, LRM, RLM
    *range(0x202A, 0x202F),  # bidi embeddings and overrides
    *range(0x2060, 0x2070),  # word joiner, invisible operators, bidi isolates
    *range(0xFE00, 0xFE10),  # variation selectors
    *range(0xE0000, 0xE0080),  # tag characters
]
_INVISIBLE_CLASS = (
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u3164\ufeff\uffa0"
    "\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufe00-\ufe0f\U000e0000-\U000e007f]"
)  # the same set as ranges: a class of single characters is ~50x slower to search
_INVISIBLE_RE = re.compile(_INVISIBLE_CLASS)
_INVISIBLE_RUN_RE = re.compile(_INVISIBLE_CLASS + "+")


def _invisible_inside_word(text: str) -> bool:
    """A run of invisible characters with a letter on both sides ("V\u200bIAGRA")."""
    n = len(text)
    for m in _INVISIBLE_RUN_RE.finditer(text):
        a, b = m.start(), m.end()
        if a > 0 and b < n and text[a - 1].isalpha() and text[b].isalpha():
            return True
    return False

# Cyrillic / Greek / fullwidth-resistant letters that render like Latin ones. Applied only to
# words that mix Latin with these scripts (a genuine Russian or Greek word is left alone).
_CONFUSABLES: dict[str, str] = {
    # Cyrillic lower
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p",
    "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ї": "i", "ј": "j", "ԁ": "d",
    "ԛ": "q", "ԝ": "w", "һ": "h", "ɡ": "g", "ո": "n", "ս": "u",
    # Cyrillic upper
    "А": "A", "В": "B", "Е": "E", "Ё": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P",
    "С": "C", "Т": "T", "У": "Y", "Х": "X", "Ѕ": "S", "І": "I", "Ї": "I", "Ј": "J", "Ԛ": "Q",
    "Ԝ": "W", "Һ": "H",
    # Greek
    "α": "a", "ο": "o", "ρ": "p", "ν": "v", "τ": "t", "ι": "i", "κ": "k", "υ": "u", "χ": "x",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N",
    "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
    # Latin look-alikes outside ASCII that NFKC keeps
    "ı": "i", "ȷ": "j", "ℓ": "l", "ɑ": "a", "ɩ": "i", "ʏ": "y",
}
# The same mapping as a list indexed by code point (the BMP; others stay as they are): str.translate
# looks a list up about three times faster than a dict, and words can be a whole message long.
_CONFUSABLE_LIST: list[int] = list(range(0x10000))
for _src, _dst in _CONFUSABLES.items():
    _CONFUSABLE_LIST[ord(_src)] = ord(_dst)
_CONFUSABLE_CHARS = "".join(_CONFUSABLES)
_CONFUSABLE_RE = re.compile("[" + re.escape(_CONFUSABLE_CHARS) + "]")
# A word (a maximal run of word characters) that mixes an ASCII letter with a look-alike: the lookbehind lets a
# match start only where a word starts, and each lookahead scans that one word, so every word is read a fixed
# number of times (an unanchored ``\w*`` pattern restarts inside a word run and costs the square of its length;
# a 195 KB run took minutes). The one capture group makes ``split`` hand back the words between the rest.
_MIXED_WORD_RE = re.compile(r"((?<!\w)(?=\w*[A-Za-z])(?=\w*[" + re.escape(_CONFUSABLE_CHARS) + r"])\w+)")


def normalize_text(text: str, defects: list[str] | None = None) -> str:
    """NFKC, strip invisible characters and map mixed-script look-alikes to Latin.

    ASCII text (the vast majority) returns at once. When ``defects`` is given, the
    evasions found are recorded there ("invisible_chars", "confusables").
    """
    if text.isascii():
        return text
    if _INVISIBLE_RE.search(text) is not None:
        # only invisible characters *inside* words are an evasion; a stray soft hyphen is not
        if defects is not None and "invisible_chars" not in defects and _invisible_inside_word(text):
            defects.append("invisible_chars")
        text = _INVISIBLE_RUN_RE.sub("", text)  # a dict-table translate costs ~100 ns for every character
    text = unicodedata.normalize("NFKC", text)
    if text.isascii() or _CONFUSABLE_RE.search(text) is None:
        return text
    # A word without a Latin letter (a genuine Russian or Greek word) stays as it is. The mixed words are mapped
    # in one call: joined by NUL (never a word character), translated and split again, so a message of ten
    # thousand look-alike words costs a few C passes, not a Python step per word.
    parts = _MIXED_WORD_RE.split(text)
    if len(parts) == 1:
        return text
    parts[1::2] = "\0".join(parts[1::2]).translate(_CONFUSABLE_LIST).split("\0")
    if defects is not None and "confusables" not in defects:
        defects.append("confusables")
    return "".join(parts)
