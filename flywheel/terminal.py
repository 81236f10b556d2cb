"""Text for a terminal: what users, files, stores and models wrote, printed so that it cannot drive it."""

from __future__ import annotations

import re
from typing import Any

from rich.markup import escape

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def safe_terminal_text(text: Any, markup: bool = True) -> str:
    r"""User-controlled text made harmless for a terminal: control characters (ESC, CSI, OSC, BEL,
    carriage return, C1 codes, bidi overrides) shown as `\x1b`-style escapes, and, for text
    printed with rich markup on, `[` escaped so it cannot open a style or a link.

        >>> safe_terminal_text("a\x1b]52;c;eA==\x07[link=x]")
        'a\\x1b]52;c;eA==\\x07\\[link=x]'
    """
    cleaned = _CONTROL.sub(lambda m: ascii(m.group())[1:-1], str(text))
    return escape(cleaned) if markup else cleaned
