"""Scripted workers for unit-testing policy rules (real-model tests live beside them).

``CharTokenizer`` maps characters to ids (digits are single tokens, like the arith
tokenizer); ``ScriptedWorker`` answers generate/judge calls from queues, and
``TableWorker`` is a tiny language model with a fixed next-token distribution per
context length, for testing token-level rules exactly.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from orchestrator.session import ModelHandle, Session
from workers.protocol import Fusion, Generation, GenParams, NextToken, Scores, TokenLogprob, WorkerInfo, WorkerStats
from workers.sampling import check_sample_reads, doubts, fill_sample_reads, sampling_probs

EOS = 3


class CharTokenizer:
    eos_token_id = EOS

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids if i != EOS)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, continue_final_message=False):
        text = "".join(f"<{m['role']}>{m['content']}" + ("" if continue_final_message and i == len(messages) - 1
                                                           else "</>") for i, m in enumerate(messages))
        return text + ("<assistant>" if add_generation_prompt else "")


class _Base:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple]] = []

    async def info(self) -> WorkerInfo:
        return WorkerInfo(model_id="scripted", backend="scripted", device="cpu", vocab_size=256,
                          vocab_fingerprint="chars", context_length=4096, eos_token_id=EOS)

    async def stats(self) -> WorkerStats:
        return WorkerStats()

    async def close(self) -> None:
        pass


class ScriptedWorker(_Base):
    """Returns scripted generations (text, finish_reason) and judge reads in order.

    A judge read is a digit (the judge position puts 0.9 on it, 0.01 on each other
    digit) or a ``{character: probability}`` table of the judge position's top tokens.
    """

    def __init__(self, generations: list[tuple[str, str]] = (), judge_scores: list[int | dict[str, float]] = ()):
        super().__init__()
        self.generations = deque(generations)
        self.judge_scores = deque(judge_scores)

    async def generate(self, prompt_ids: list[int], params: GenParams) -> Generation:
        self.calls.append(("generate", (len(prompt_ids), params.max_tokens)))
        text, reason = self.generations.popleft()
        ids = [ord(c) for c in text][: params.max_tokens]
        return Generation(token_ids=ids + ([EOS] if reason == "eos" else []), text=text, finish_reason=reason,
                          stop_reason=params.stop[0] if reason == "stop" else None)

    async def next_token_logprobs(self, prefix_ids: list[int], candidates: list[int], top_k: int = 0) -> NextToken:
        self.calls.append(("judge", (len(prefix_ids),)))
        d = self.judge_scores.popleft()
        table = d if isinstance(d, dict) else {str(i): 0.9 if i == d else 0.01 for i in range(10)}
        lps = {ord(c): math.log(q) for c, q in table.items()}
        top = dict(sorted(lps.items(), key=lambda kv: -kv[1])[:top_k])
        return NextToken(candidates={c: lps.get(c, -math.inf) for c in candidates}, top=top)

    async def score(self, prefix_ids, continuation_ids, **kw) -> Scores:
        raise AssertionError("not scripted")


def _top(logprobs: torch.Tensor, k: int) -> dict[int, float]:
    vals, idx = logprobs.topk(min(k, len(logprobs)))
    return dict(zip(idx.tolist(), vals.tolist())) if k else {}


class TableWorker(_Base):
    """A language model over tokens {0, 1, 2, EOS}: fixed logits per position.

    ``markov``: the logits depend on the context's last token instead (row 1 + that
    token; row 0 for an empty context), for rules whose decisions depend on what was drawn.
    """

    def __init__(self, logits: list[list[float]], markov: bool = False):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)
        self.markov = markov
        self.rows_sent = 0  # vocabulary-sized rows its score calls returned (full_dists, full_next)

    def _at(self, context: list[int]) -> torch.Tensor:
        if self.markov:
            return self.logits[1 + context[-1] if context else 0]
        return self._row(len(context))

    def _row(self, pos: int) -> torch.Tensor:
        return self.logits[min(pos, len(self.logits) - 1)]

    async def generate(self, prompt_ids: list[int], params: GenParams) -> Generation:
        g = torch.Generator().manual_seed(params.seed or 0)
        ids = list(prompt_ids)
        out, lps = [], []
        drawn = []
        for _ in range(params.max_tokens):
            row = self._at(ids)
            probs = sampling_probs(row, params.temperature, params.top_k, params.top_p)
            tok = int(row.argmax()) if params.greedy else int(torch.multinomial(probs, 1, generator=g))
            drawn.append(math.log(float(probs[tok])))
            out.append(tok)
            ids.append(tok)
            if params.logprobs is not None:  # as the hf backend reports them: raw log-softmax, top-k by rank
                lp = torch.log_softmax(row, -1)
                lps.append(TokenLogprob(token_id=tok, logprob=float(lp[tok]), top=_top(lp, params.logprobs)))
            if tok == EOS or params.stop_below is not None and doubts(row, params.stop_below):
                break
        return Generation(token_ids=out, text="", finish_reason="eos" if out[-1] == EOS else "length",
                          logprobs=lps if params.logprobs is not None else None,
                          sample_logprobs=drawn if params.sample_logprobs and not params.greedy else None)

    async def score(self, prefix_ids, continuation_ids, top_k=0, entropies=False, full_dists=False,
                    full_next=False, sample: GenParams | None = None, draws: int = 0,
                    candidates: list[list[int]] | None = None, fuse: Fusion | None = None) -> Scores:
        """As the backends answer it: the sampling reads come from the same ``fill_sample_reads``."""
        self.calls.append(("score", (len(prefix_ids), len(continuation_ids))))
        check_sample_reads(len(continuation_ids), sample, draws, candidates, len(self.logits[0]), fuse)
        ctx = [*prefix_ids, *continuation_ids]
        n = len(prefix_ids)
        rows = [torch.log_softmax(self._at(ctx[: n + i]), -1) for i in range(len(continuation_ids) + 1)]
        out = Scores(
            logprobs=[float(r[t]) for r, t in zip(rows, continuation_ids)],
            top=[_top(r, top_k) for r in rows[:-1]] if top_k else None,
            entropies=[float(-(r.exp() * r).sum()) for r in rows[:-1]] if entropies else None,
            dists=[r.tolist() for r in rows[:-1]] if full_dists else None,
            next_logprobs=rows[-1].tolist() if full_next else None,
        )
        self.rows_sent += len(out.dists or []) + (out.next_logprobs is not None)
        if sample is not None:
            fill_sample_reads(out, torch.stack(rows), continuation_ids, sample, draws, candidates, fuse)
        return out

    async def next_token_logprobs(self, prefix_ids, candidates, top_k=0) -> NextToken:
        row = torch.log_softmax(self._at(list(prefix_ids)), -1)
        vals, idx = row.topk(min(top_k, len(row))) if top_k else (torch.tensor([]), torch.tensor([], dtype=torch.long))
        return NextToken(candidates={c: float(row[c]) for c in candidates}, top=dict(zip(idx.tolist(), vals.tolist())))


def make_session(small, large, *, max_tokens: int = 200, temperature: float = 0.0, seed: int = 0,
                 prompt: list[int] | None = None, vocabs: tuple[str, str] = ("chars", "chars")) -> Session:
    """``vocabs``: the models' vocabulary fingerprints; different ones make the session exchange text, not ids."""
    tok = CharTokenizer()
    models = {r: ModelHandle(r, w, tok, EOS, v) for r, w, v in (("small", small, vocabs[0]), ("large", large, vocabs[1]))}
    prompt = prompt if prompt is not None else [1]
    return Session(problem="p", models=models, prompt_ids={"small": list(prompt), "large": list(prompt)},
                   params=GenParams(temperature=temperature, max_tokens=max_tokens), max_tokens=max_tokens, seed=seed)


class ChoiceWorker(_Base):
    """A text-level model for policy probes: ``script(context)`` lists the continuations it may write.

    Each generate call draws one continuation (weighted, with the call's seed; the
    first under greedy decoding) and writes it through the usual stop strings and
    ``max_tokens``; a continuation written to its end finishes with EOS. Token ids
    are characters (``CharTokenizer``) and include the stop string, as the hf backend's
    do. ``judge(context)`` gives the digit a judge read returns (9 by default). The
    context is the text after the first ``prompt_len`` ids.
    """

    def __init__(self, script, judge=None, prompt_len: int = 1):
        super().__init__()
        self.script, self.judge, self.prompt_len = script, judge, prompt_len

    def _context(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids[self.prompt_len:] if i != EOS)

    async def generate(self, prompt_ids: list[int], params: GenParams) -> Generation:
        self.calls.append(("generate", (len(prompt_ids), params.max_tokens)))
        choices = self.script(self._context(prompt_ids))
        if params.greedy:
            text = choices[0][0]
        else:
            import random
            text = random.Random(params.seed).choices([c for c, _ in choices], [w for _, w in choices])[0]
        ends = [(text.find(s) + len(s), s) for s in params.stop if s in text]
        cut, stop = min(ends) if ends else (len(text), None)
        if cut > params.max_tokens:
            return Generation(token_ids=[ord(c) for c in text[: params.max_tokens]], text=text[: params.max_tokens],
                              finish_reason="length")
        if stop is not None:
            return Generation(token_ids=[ord(c) for c in text[:cut]], text=text[: cut - len(stop)],
                              finish_reason="stop", stop_reason=stop)
        if len(text) >= params.max_tokens:
            return Generation(token_ids=[ord(c) for c in text[: params.max_tokens]], text=text[: params.max_tokens],
                              finish_reason="length")
        return Generation(token_ids=[ord(c) for c in text] + [EOS], text=text, finish_reason="eos")

    async def next_token_logprobs(self, prefix_ids: list[int], candidates: list[int], top_k: int = 0) -> NextToken:
        self.calls.append(("judge", (len(prefix_ids),)))
        d = 9 if self.judge is None else self.judge(self._context(prefix_ids))
        lps = {ord(str(i)): math.log(0.9 if i == d else 0.01) for i in range(10)}
        top = dict(sorted(lps.items(), key=lambda kv: -kv[1])[:top_k])
        return NextToken(candidates={c: lps.get(c, -math.inf) for c in candidates}, top=top)

    async def score(self, prefix_ids, continuation_ids, top_k=0, entropies=False, full_dists=False,
                    full_next=False, sample: GenParams | None = None) -> Scores:
        """Greedy documents only: 0.9 on the first choice's next character (EOS at its end)."""
        self.calls.append(("score", (len(prefix_ids), len(continuation_ids))))
        ids = list(prefix_ids)
        logprobs, best = [], []
        for t in [*continuation_ids, None]:
            text = self.script(self._context(ids))[0][0]
            nxt = ord(text[0]) if text else EOS
            best.append(nxt)
            if t is not None:
                logprobs.append(math.log(0.9) if t == nxt else math.log(0.1 / 255))
                ids.append(t)
        return Scores(logprobs=logprobs, sampled=best if sample is not None else None)


def document(doc: str, strict: bool = True):
    """A ``ChoiceWorker`` script that writes ``doc`` from the context's length on.

    ``strict``: the context must be a prefix of ``doc`` (the model wrote all of it);
    otherwise the model writes ``doc``'s characters by position whatever came before.
    """
    def script(context: str) -> list[tuple[str, float]]:
        assert not strict or doc.startswith(context), (context, doc)
        return [(doc[len(context):], 1.0)]
    return script
