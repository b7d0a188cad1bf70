"""Final-answer extraction: the content of the last ``\\boxed{...}`` (balanced braces)."""

from __future__ import annotations


def last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
                j += 1
        start = text.rfind("\\boxed", 0, start)
    return None


def final_answer(text: str) -> str | None:
    """The answer of a response: boxed after ``</think>`` when there is one, else anywhere."""
    _, sep, after = text.rpartition("</think>")
    return (last_boxed(after) if sep else None) or last_boxed(text)
