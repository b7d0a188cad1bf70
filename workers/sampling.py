"""The sampling distribution implied by temperature / top-k / top-p, and what a score call reads from it.

Shared by the backends (to sample, and to answer ``Worker.score``'s sampling reads)
and by lossless speculative decoding (to compute p and q for the accept/reject
rule), so all agree exactly on what distribution a sampled token came from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from workers.protocol import Fusion, GenParams, Scores, WorkerError


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Probabilities over the last dimension after temperature, top-k and top-p filtering."""
    x = logits.float() / max(temperature, 1e-5)
    if top_k and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, -1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True, dim=-1)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def doubts(logits: torch.Tensor, threshold: float) -> bool:
    """Whether the top-1 probability of a row of logits (temperature 1) is under ``threshold``.

    ``GenParams.stop_below``'s test, run on every token a generation so asked emits: max minus
    logsumexp, one pass over the row (no softmax row built).
    """
    x = logits.float()
    return float(x.max() - torch.logsumexp(x, -1)) < math.log(threshold)


def draw(probs: torch.Tensor, n: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` independent draws (with replacement) from each row of ``probs``: token ids of shape ``(*rows, n)``.

    Inverse-CDF sampling: one uniform number per draw, located in the row's cumulative
    sums (float64, so a 131k-entry row keeps its small probabilities). The distribution of
    ``torch.multinomial(probs, n, replacement=True)``, whose CPU kernel costs ~3 ms per
    131k-entry row here against ~0.2 ms for this; a token of probability 0 is never drawn.
    """
    cdf = probs.double().cumsum(-1)
    u = torch.rand((*cdf.shape[:-1], n), generator=generator, dtype=torch.float64, device=cdf.device)
    return torch.searchsorted(cdf, u * cdf[..., -1:], right=True).clamp_(max=cdf.shape[-1] - 1)


def token_logprobs(probs: torch.Tensor, tokens: Sequence[int]) -> list[float]:
    """``log(probs[i, tokens[i]])`` for each row i: the log-prob each row gives its own token.

    The log of the entries read, not of the whole rows (a vocabulary-sized pass per row).
    """
    index = torch.as_tensor(list(tokens), dtype=torch.long, device=probs.device)
    return probs.gather(1, index[:, None])[:, 0].log().tolist()


def drawn_logprobs(rows: torch.Tensor, tokens: Sequence[int], params: GenParams) -> list[float]:
    """Each token's log-prob under the sampling distribution of its row (``GenParams.sample_logprobs``)."""
    return token_logprobs(sampling_probs(rows, params.temperature, params.top_k, params.top_p), tokens)


def fuse(plain: torch.Tensor, reflective: torch.Tensor, alpha: float, kind: str) -> torch.Tensor:
    """Fused log-probabilities of two (batches of) rows of log-probabilities (``Fusion``)."""
    if kind == "linear":
        if alpha in (0.0, 1.0):
            return reflective if alpha == 1.0 else plain
        return torch.logaddexp(plain + math.log1p(-alpha), reflective + math.log(alpha))
    return torch.log_softmax((1 - alpha) * plain + alpha * reflective, -1)


def fused_rows(logprobs: torch.Tensor, fusion: Fusion) -> torch.Tensor:
    """The n - k + 1 fused rows of a score call's n + 1 rows of log-probabilities: row i with row k + i."""
    return fuse(logprobs[: len(logprobs) - fusion.offset], logprobs[fusion.offset :], fusion.alpha, fusion.kind)


def check_sample_reads(n_continuation: int, sample: GenParams | None, draws: int,
                       candidates: list[list[int]] | None, vocab_size: int, fuse: Fusion | None = None) -> None:
    """Reject a score call's ``draws``/``candidates``/``fuse`` that no sampling distribution can answer (before any
    work)."""
    if draws < 0:
        raise WorkerError(f"draws must be >= 0, got {draws}")
    if fuse is not None:
        if sample is None:
            raise WorkerError("fuse changes the sampling reads: pass sample params")
        if fuse.offset > n_continuation:
            raise WorkerError(f"fuse offset {fuse.offset} is beyond a continuation of {n_continuation} tokens")
        n_continuation -= fuse.offset  # the reads are over the fused rows
    if not draws and candidates is None:
        return
    if sample is None or sample.greedy:
        raise WorkerError("draws and candidates read a sampling distribution: pass sample params with temperature > 0")
    if candidates is not None:
        if len(candidates) > n_continuation + 1:
            raise WorkerError(f"candidates for {len(candidates)} positions, but a continuation of {n_continuation} "
                              f"tokens has {n_continuation + 1}")
        bad = [t for row in candidates for t in row if not 0 <= t < vocab_size]
        if bad:
            raise WorkerError(f"candidate token ids outside the vocabulary of {vocab_size}: {bad[:5]}")


def fill_sample_reads(scores: Scores, rows: torch.Tensor, continuation: Sequence[int], sample: GenParams,
                      draws: int = 0, candidates: list[list[int]] | None = None, fuse: Fusion | None = None) -> None:
    """Answer a score call's sampling reads from its rows (one per continuation token + 1: logits or log-probs;
    log-probs with ``fuse``, which mixes normalised rows).

    ``sampled``: the argmax under greedy params, else one seeded draw per row; then,
    from the same generator (so ``sampled`` does not depend on them), ``draws`` more
    draws per row with their sampling log-probs; ``sample_logprobs``: the sampling
    log-prob of each continuation token; ``candidate_logprobs[i]``: that of each token of
    ``candidates[i]`` at row i. Lossless verification reads p and q at a few tokens
    through these instead of moving vocabulary-sized rows. With ``fuse`` the reads are
    over the fused rows (``fused_rows``) and the continuation's first n - k tokens.
    """
    if fuse is not None:
        rows = fused_rows(rows, fuse)
        continuation = continuation[: len(rows) - 1]
    if sample.greedy:
        scores.sampled = rows.argmax(-1).tolist()
        return
    probs = sampling_probs(rows, sample.temperature, sample.top_k, sample.top_p)
    rng = torch.Generator(device=rows.device).manual_seed(sample.seed) if sample.seed is not None else None
    scores.sampled = draw(probs, 1, rng)[:, 0].tolist()
    scores.sample_logprobs = token_logprobs(probs[: len(continuation)], continuation)
    if draws:
        drawn = draw(probs, draws, rng)
        scores.draws = drawn.tolist()
        scores.draw_logprobs = probs.gather(1, drawn).log().tolist()  # logs of the entries read only
    if candidates is not None:
        scores.candidate_logprobs = [probs[i, torch.as_tensor(c, dtype=torch.long, device=rows.device)].log().tolist()
                                     for i, c in enumerate(candidates)]
