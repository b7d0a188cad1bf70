"""The session's token log: models see their own ids; only a boundary window is ever re-encoded.

Runs on Mistral's 131k-vocabulary BPE tokenizer (tekken, shipped offline inside
``mistral_common``), whose merges cross step boundaries (``".\\n\\n"`` is one token),
and on the arith tokenizer.
"""

from __future__ import annotations

import pickle

from typing import Any

import pytest
from transformers import AutoTokenizer

from evals.bench_scale import synthetic_chain, tekken_folder
from orchestrator.session import ModelHandle
from orchestrator.token_log import IncrementalText, Piece, TokenLog
from tests.conftest import arith_model


class CountingTokenizer:
    """A tokenizer that counts the characters it is asked to encode."""

    def __init__(self, tok: Any):
        self.tok, self.encoded_chars = tok, 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.encoded_chars += len(text)
        return self.tok.encode(text, add_special_tokens=add_special_tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tok, name)


@pytest.fixture(scope="module")
def tekken() -> Any:
    return AutoTokenizer.from_pretrained(tekken_folder())


def handle(tok: Any, fingerprint: str = "v") -> ModelHandle:
    return ModelHandle("large", worker=None, tokenizer=tok, eos_token_id=tok.eos_token_id, vocab_fingerprint=fingerprint)


def steps_of(tok: Any, n: int = 40) -> list[str]:
    return [s + "\n\n" for s in synthetic_chain(n, 40, tok).split("\n\n")]


def test_step_by_step_encoding_differs_from_whole_with_a_real_bpe(tekken):
    """Why the log keeps ids: re-encoding text step by step is not what encoding it whole gives."""
    steps = steps_of(tekken, 10)
    # a model writes a step up to its stop string; the delimiter is put back as text
    by_step = [t for s in steps for part in (s[:-2], "\n\n") for t in tekken.encode(part, add_special_tokens=False)]
    assert by_step != tekken.encode("".join(steps), add_special_tokens=False)
    assert len(tekken.encode(".\n\n", add_special_tokens=False)) == 1  # one token across the boundary


def test_text_from_another_vocabulary_is_encoded_at_the_boundary_like_the_whole(tekken):
    steps = steps_of(tekken)
    prompt = tekken.encode("[USER]problem[/USER]", add_special_tokens=False)
    log = TokenLog(handle(tekken), prompt)
    for s in steps:  # pieces without author ids: written by a model of another vocabulary
        log.append(Piece(s))
    assert log.ids.tolist() == prompt + tekken.encode("".join(steps), add_special_tokens=False)


def test_a_model_sees_its_own_ids_as_written(tekken):
    """A step ends ". " then a delimiter the model wrote as its own tokens; re-encoding would merge them."""
    h = handle(tekken)
    own = tekken.encode("So x = 4.", add_special_tokens=False) + tekken.encode("\n\n", add_special_tokens=False)
    log = TokenLog(h, [1])
    log.append(Piece("So x = 4.\n\n", own, "v"))
    assert log.ids.tolist() == [1] + own
    assert own != tekken.encode("So x = 4.\n\n", add_special_tokens=False)  # the whole text encodes otherwise
    # a step cut at a length limit: its ids as written, then the delimiter as text after them
    cut = tekken.encode("So y = 5.", add_special_tokens=False)
    log.append(Piece("So y = 5.\n\n", cut, "v"))
    assert log.ids[: 1 + len(own) + len(cut)].tolist() == [1] + own + cut
    assert tekken.decode(log.ids[1:]) == "So x = 4.\n\nSo y = 5.\n\n"
    # text after a model's own ids is encoded after them, never merged into them
    log.append(Piece(" More."))
    assert log.ids[: 1 + len(own) + len(cut)].tolist() == [1] + own + cut
    # another vocabulary's ids are never used: the text is encoded
    other = TokenLog(h, [1])
    other.append(Piece("So x = 4.\n\n", own, "another vocabulary"))
    assert other.ids.tolist() == [1] + tekken.encode("So x = 4.\n\n", add_special_tokens=False)


def test_views_leave_the_log_alone(tekken):
    log = TokenLog(handle(tekken), [1])
    log.append(Piece("A step.\n\n"))
    before = list(log.ids)
    keep, new = log.split(Piece("Next step."), Piece("\n\n"))
    assert log.ids.tolist() == before
    assert log.ids[:keep].tolist() + new == log.view(Piece("Next step.\n\n")).tolist()
    assert tekken.decode(log.view(Piece("Next step.\n\n"))[1:]) == "A step.\n\nNext step.\n\n"


def test_a_log_handed_to_a_call_in_flight_never_changes(tekken):
    """Accepting text replaces the log with a new buffer, so ids a call was given stay exactly as given."""
    log = TokenLog(handle(tekken), [1])
    log.append(Piece("So x = 4"))
    given, viewed = log.ids, log.view(Piece(".\n\n"))
    before, seen = given.tolist(), viewed.tolist()
    log.append(Piece(".\n\n"))  # "." merges with what came before: the log is cut back, then grows
    log.extend([7, 8])
    assert given.tolist() == before and viewed.tolist() == seen
    assert log.ids.tolist() == seen + [7, 8]
    assert pickle.loads(pickle.dumps(log.ids)) == log.ids  # crosses Ray as one buffer


def test_work_per_step_does_not_grow_with_the_chain(tekken):
    """Only the new text and a window of at most WINDOW tokens are encoded, however long the chain."""
    counting = CountingTokenizer(tekken)
    log = TokenLog(handle(counting), [1])
    steps = steps_of(tekken, 200)
    costs = []
    for s in steps:
        counting.encoded_chars = 0
        log.append(Piece(s))
        costs.append(counting.encoded_chars - len(s))
    assert len(log.ids) > 9_000
    assert max(costs) <= 8 * max(len(t) for t in tekken.get_vocab())  # the window, never the chain


def test_incremental_text_equals_decoding_the_whole(tekken):
    text = "Résumé: 12 + 7 = 19 ✓. Wait — 19 − 3 = 16 🎉.\n\nSo the answer is \\boxed{16}."
    ids = tekken.encode(text, add_special_tokens=False)
    h = handle(tekken)
    inc = IncrementalText(h, 1)
    log, out = [1], []
    for t in ids:  # one token at a time: characters split across byte tokens wait for their rest
        log.append(t)
        out.append(inc.advance(log))
    assert "".join(out) == tekken.decode(ids) == text


def test_arith_tokenizer_pieces_equal_whole_encoding():
    tok = AutoTokenizer.from_pretrained(arith_model("large"))
    steps = ["12 + 7 = 19\n\n", "19 - 3 = 16\n\n", "So the answer is \\boxed{16}."]
    log = TokenLog(handle(tok), [0])
    for s in steps:
        log.append(Piece(s))
    assert log.ids.tolist() == [0] + tok.encode("".join(steps), add_special_tokens=False)
