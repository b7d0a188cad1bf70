"""A model's view of a request as a token log: prompt, then the reasoning in its own ids.

The log only grows (or is cut back); a model's own output ids are appended as
written, so what it sees next is exactly what it wrote and its prefix cache serves
all of it. Text written by another model with another vocabulary (or inserted by a
policy) is tokenized incrementally: only a small window at the boundary is
re-encoded, since byte-level BPE merges across it (``".\\n\\n"`` is one token in
Qwen's and Mistral's vocabularies), in the manner of Hugging Face's universal
assisted generation. Every operation costs O(new text + window) in Python, never
O(chain).

The ids are kept in a C ``int32`` buffer (``array('i')``), not a Python list: a
step hands out several views of a 32k-token chain (the next step's prompt, a
judge's context, a look-ahead draft's prompt), and copying, concatenating or
pickling (Ray) a buffer is a memcpy (about 12 us at 34k ids, against 0.6 ms for a
list slice and concatenation and 0.9 ms for pickling a list). What a buffer
handed out holds is never changed: appending text makes a new buffer (it may cut
back the last tokens to re-encode them), so a call still in flight keeps reading
exactly what it was given. Only ``extend``, a token-level policy's accepted ids
(its calls have all returned by then), grows the buffer in place, as a round
accepts a few tokens and copying 32k ids for each would cost more than the round.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from workers.protocol import TokenIds, token_ids

if TYPE_CHECKING:
    from orchestrator.session import ModelHandle

#: Tokens of the log re-encoded with new text: merges across a boundary reach this far back at most.
WINDOW = 8


@dataclass(frozen=True)
class Piece:
    """Text about to join the reasoning, and the ids its author wrote for it (``ids=None``: no author ids)."""

    text: str
    ids: list[int] | None = None
    vocab: str | None = None  # the fingerprint of the vocabulary ``ids`` belong to


class TokenLog:
    """Prompt + reasoning in one model's token ids."""

    def __init__(self, handle: ModelHandle, prompt_ids: Iterable[int]):
        self.handle = handle
        self.ids: TokenIds = token_ids(prompt_ids)
        self.n_prompt = len(self.ids)
        self.fixed = self.n_prompt  # ids before this are the prompt or this model's own: never re-encoded

    def split(self, *pieces: Piece) -> tuple[int, list[int]]:
        """``(keep, new)``: the log with ``pieces`` is ``ids[:keep] + new`` (the log itself is unchanged)."""
        return self._split(pieces)[:2]

    def _split(self, pieces: tuple[Piece, ...]) -> tuple[int, list[int], int]:
        keep, new, fixed = len(self.ids), [], self.fixed
        for piece in pieces:
            keep, new, fixed = self._extend(keep, new, fixed, piece)
        return keep, new, fixed

    def view(self, *pieces: Piece) -> TokenIds:
        """The ids this model would see with ``pieces`` appended (a new buffer)."""
        keep, new = self.split(*pieces)
        return self.ids[:keep] + token_ids(new)

    def append(self, *pieces: Piece) -> None:
        keep, new, self.fixed = self._split(pieces)
        self.ids = self.ids[:keep] + token_ids(new)

    def extend(self, ids: Iterable[int]) -> None:
        """Append this model's own ids as they are, in place (token-level policies: one shared vocabulary)."""
        self.ids.extend(ids)

    # ------------------------------------------------------------ internals

    def _extend(self, keep: int, new: list[int], fixed: int, piece: Piece) -> tuple[int, list[int], int]:
        if not piece.text and not piece.ids:
            return keep, new, fixed
        if piece.ids is not None and piece.vocab == self.handle.vocab_fingerprint:
            written = self.handle.decode(piece.ids)
            if piece.text.startswith(written):  # the author's own ids, as written (then, e.g., a delimiter)
                new = new + list(piece.ids)
                fixed = keep + len(new)
                return (*self._encode_after(keep, new, fixed, piece.text[len(written):]), fixed)
        return (*self._encode_after(keep, new, fixed, piece.text), fixed)

    def _encode_after(self, keep: int, new: list[int], fixed: int, text: str) -> tuple[int, list[int]]:
        """``ids[:keep] + new`` followed by ``text``, re-encoding at most the last ``WINDOW`` tokens with it.

        The window never reaches into ids a model wrote itself (``fixed``): those
        stay as written. Assumes a tokenizer whose decode/encode round trip is exact
        inside a text (byte-level BPE: Qwen, Llama 3, Mistral tekken, the arith one).
        """
        if not text:
            return keep, new
        end = keep + len(new)
        start = max(fixed, end - WINDOW)
        window = self.ids[start:keep].tolist() + new[max(0, start - keep) :]
        window_text = self.handle.tokenizer.decode(window, skip_special_tokens=False)
        if "\ufffd" in window_text:  # the window starts inside a multi-byte character: leave it as it is
            start, window, window_text = end, [], ""
        fresh = self.handle.encode(window_text + text)
        same = 0
        while same < min(len(window), len(fresh)) and window[same] == fresh[same]:
            same += 1
        cut = start + same  # the combined ids stay as they are up to here
        if cut <= keep:
            return cut, fresh[same:]
        return keep, new[: cut - keep] + fresh[same:]


class IncrementalText:
    """Decodes a token log's reasoning as it grows, a few tokens of context at a time.

    Detokenizing new ids alone can differ from decoding the whole (leading spaces,
    characters split across tokens), so each step decodes a short window before
    them and keeps only what they add; a trailing incomplete character waits for
    the ids that complete it.
    """

    LOOKBACK = 6

    def __init__(self, handle: ModelHandle, start: int):
        self.handle, self.read = handle, start
        self.start = start

    def advance(self, ids: Sequence[int]) -> str:
        """The text ``ids[self.read:]`` adds to the reasoning (possibly empty while a character is incomplete)."""
        lo = max(self.start, self.read - self.LOOKBACK)
        before = self.handle.decode(ids[lo : self.read])
        full = self.handle.decode(ids[lo:])
        if full.endswith("\ufffd"):
            return ""
        self.read = len(ids)
        return full[len(before) :]
