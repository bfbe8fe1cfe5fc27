"""Close-name suggestions for errors about unknown names (architectures, losses, config keys)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """``" Did you mean 'a', 'b'?"`` for the choices closest to ``name``, or ``""`` when none is close."""
    spelled = {choice.lower(): choice for choice in choices}  # matched ignoring case, shown as spelled
    close = difflib.get_close_matches(name.lower(), list(spelled), n=n)
    return f" Did you mean {', '.join(repr(spelled[c]) for c in close)}?" if close else ""
