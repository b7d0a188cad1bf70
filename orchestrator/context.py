"""What must fit in a model's context window, checked before the model is asked.

Two rules, both against the asked model's ``context_length`` (``WorkerInfo``):

- **a request's prompt** must leave every model it may ask at least ``MIN_OUTPUT_TOKENS``,
  else ``ContextLengthError`` before any model work (a 400 ``context_length_exceeded``
  from the server, a per-problem error in evals). Past its window a model writes
  garbage, and a huge prompt costs minutes and gigabytes to prefill.
- **a running chain** never runs a model past its window: ``Session`` caps each
  ``generate`` to the room left, and a call with no room raises ``ContextFull``,
  which ends the session with finish reason ``length``.

Counting a huge prompt's tokens is itself costly (tokenizing a 10 MB line), so the
count is bounded first by characters: no token covers more characters than the
longest entry of its vocabulary, so a text longer than that many times the limit
cannot fit, and only a text that might fit is tokenized.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from orchestrator.prompting import Messages, chat_text

if TYPE_CHECKING:
    from orchestrator.session import ModelHandle

#: Room a prompt must leave for the answer: below this a request could only be cut off at once.
MIN_OUTPUT_TOKENS = 16


class ContextLengthError(ValueError):
    """A prompt that leaves a model no room to answer; raised before any model work."""

    def __init__(self, role: str, prompt_tokens: int, context_length: int, *, chars: int | None = None):
        """``chars``: the prompt was refused by its length in characters, so it has over ``prompt_tokens``."""
        self.role, self.prompt_tokens, self.context_length = role, prompt_tokens, context_length
        size = f"{prompt_tokens} tokens" if chars is None else f"over {prompt_tokens} tokens ({chars} characters)"
        super().__init__(
            f"the prompt is {size} but the {role} model's context is {context_length} tokens, "
            f"which must also hold at least {MIN_OUTPUT_TOKENS} output tokens; shorten the messages"
        )


class ContextFull(Exception):
    """A session's model call would run past the model's context: the chain ends with "length".

    Control flow, not an error: the Orchestrator catches it around the policy.
    """

    def __init__(self, role: str, tokens: int, context_length: int):
        super().__init__(f"{role}: {tokens} tokens leave no room in a context of {context_length}")


@functools.lru_cache(maxsize=16)
def max_token_chars(tokenizer: Any) -> int | None:
    """Characters of the vocabulary's longest entry: no token covers more (None: vocabulary unknown).

    Byte-level entries are spelled one character per byte, so they bound the decoded text too.
    """
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else None
    return max(map(len, vocab), default=None) if vocab else None


def fitting_prompt_ids(handle: ModelHandle, messages: Messages) -> list[int]:
    """``handle``'s prompt ids for ``messages``; ContextLengthError when they leave under ``MIN_OUTPUT_TOKENS``.

    A text too long to fit whatever its tokenization is refused without tokenizing it.
    """
    text = chat_text(handle.tokenizer, messages)
    if handle.context_length is None:
        return handle.encode(text)
    limit = handle.context_length - MIN_OUTPUT_TOKENS
    widest = max_token_chars(handle.tokenizer)
    if widest is not None and len(text) > limit * widest:
        raise ContextLengthError(handle.role, limit, handle.context_length, chars=len(text))
    ids = handle.encode(text)
    if len(ids) > limit:
        raise ContextLengthError(handle.role, len(ids), handle.context_length)
    return ids


def room(handle: ModelHandle, tokens: int, new: int = 1) -> int:
    """Tokens ``handle``'s model can still write after ``tokens``; ContextFull when under ``new``.

    ``new=0`` checks that ``tokens`` fit at all (a scoring pass).
    """
    if handle.context_length is None:
        return 1 << 30
    left = handle.context_length - tokens
    if left < new:
        raise ContextFull(handle.role, tokens, handle.context_length)
    return left
