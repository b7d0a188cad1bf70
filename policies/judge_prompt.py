"""How a judge request is laid out in token space.

The large model judges a step in one prefill-only pass over
``context_ids + suffix_ids``, where ``context_ids`` is exactly what the model has
already seen while reasoning (prompt + reasoning so far + the candidate step), so
the whole prefix is served from its KV cache and only the short suffix is new.
The suffix is the chat-template text that closes the assistant turn, asks for a
0-9 score and opens a pre-filled answer; it is cut out of a template rendering
around a sentinel, so it is right for any model's chat template.
"""

from __future__ import annotations

import functools
from typing import Any

DEFAULT_INSTRUCTION = (
    "Rate the last reasoning step for correctness only: is it factually right and does it follow "
    "from the steps before it? Answer with one digit from 0 (wrong) to 9 (certainly correct)."
)
DEFAULT_PREFILL = "Score:"
_SENTINEL = "\u2591REASONSPEC_SENTINEL\u2591"


def judge_suffix_text(tokenizer: Any, instruction: str = DEFAULT_INSTRUCTION, prefill: str = DEFAULT_PREFILL) -> str:
    """Text that follows the reasoning in a judge request (template-specific)."""
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": _SENTINEL},
        {"role": "user", "content": instruction},
        {"role": "assistant", "content": prefill},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    _, sep, suffix = rendered.partition(_SENTINEL)
    if not sep:
        raise ValueError("the chat template dropped the assistant turn; cannot build a judge prompt for this model")
    return suffix


@functools.lru_cache(maxsize=32)
def judge_suffix_ids(tokenizer: Any, instruction: str = DEFAULT_INSTRUCTION, prefill: str = DEFAULT_PREFILL) -> tuple[int, ...]:
    """The judge suffix in ``tokenizer``'s ids, computed once per tokenizer and prompt (a pure function)."""
    return tuple(tokenizer.encode(judge_suffix_text(tokenizer, instruction, prefill), add_special_tokens=False))
