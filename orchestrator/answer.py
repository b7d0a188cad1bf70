"""Final-answer extraction: the content of the last ``\\boxed{...}`` (balanced braces).

One pass over the text with a stack of open braces, so extraction is linear in the
length of the response: a model that writes ``\\boxed{`` thousands of times, unclosed,
must not stall grading (the earlier rescan from every ``\\boxed`` was quadratic).
"""

from __future__ import annotations

import re

#: A brace, or ``\\boxed`` (spaces allowed) with the brace that opens its content.
_TOKEN = re.compile(r"\\boxed *\{|[{}]")


def last_boxed(text: str) -> str | None:
    """The content of the ``\\boxed{`` that starts last among those whose brace closes."""
    open_braces: list[int | None] = []  # per open brace: where its \\boxed content starts, None for a plain brace
    best_start, best = -1, None
    for m in _TOKEN.finditer(text):
        if m.group() == "}":
            if open_braces and (start := open_braces.pop()) is not None and start > best_start:
                best_start, best = start, text[start : m.start()]
        else:
            open_braces.append(m.end() if len(m.group()) > 1 else None)
    return best.strip() if best is not None else None


def final_answer(text: str) -> str | None:
    """The answer of a response: boxed after ``</think>`` when there is one, else anywhere."""
    _, sep, after = text.rpartition("</think>")
    return (last_boxed(after) if sep else None) or last_boxed(text)
