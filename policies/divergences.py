"""Divergences between a verifier's and a drafter's next-token distributions (FSD, PyramidSD).

Fuzzy speculative decoding accepts a draft position when Div(p, q) <= T, where
p is the verifier's distribution and q the drafter's. The names and conventions
are those of the FSD reference code (maxholsman/fsd ``fsd_utils.py``):

- ``kl_div``: KL(q || p), torch's ``kl_div(log p, q)``;
- ``kl_div_reversed``: KL(p || q);
- ``js_div``: 1/2 KL(p || m) + 1/2 KL(q || m), m = (p + q) / 2 (at most ln 2);
- ``tv_div``: 1/2 sum |p - q| (at most 1).

``top_k`` > 0 is FSD's ``top_k_*`` family: the verifier's top-k tokens keep their
own entries and the rest of the vocabulary is pooled into one bucket, in both
distributions. FSD's ``top_p_*`` variants are not implemented. Natural logarithms.
The inputs are probabilities of the *raw* distributions (FSD computes its
divergences before temperature, top-k and top-p).
"""

from __future__ import annotations

from typing import Literal

import torch

Divergence = Literal["kl_div", "kl_div_reversed", "js_div", "tv_div"]


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row (0 log 0 = 0; a mass where b has none gives inf)."""
    return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)


def bucket_top_k(p: torch.Tensor, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """p and q on p's top-k tokens per row plus one bucket holding the remaining mass of each."""
    idx = p.topk(min(k, p.shape[-1]), dim=-1).indices
    pk, qk = p.gather(-1, idx), q.gather(-1, idx)
    rest = lambda x: (1 - x.sum(-1, keepdim=True)).clamp_min(0)  # noqa: E731
    return torch.cat([pk, rest(pk)], -1), torch.cat([qk, rest(qk)], -1)


def divergence(kind: Divergence, p: torch.Tensor, q: torch.Tensor, top_k: int = 0) -> torch.Tensor:
    """Div(p, q) per row of probability rows p (verifier) and q (drafter)."""
    p, q = p.double(), q.double()  # thresholds near 0 compare against small divergences: keep them precise
    if top_k:
        p, q = bucket_top_k(p, q, top_k)
    if kind == "kl_div":
        return _kl(q, p)
    if kind == "kl_div_reversed":
        return _kl(p, q)
    if kind == "js_div":
        m = (p + q) / 2
        return (_kl(p, m) + _kl(q, m)) / 2
    if kind == "tv_div":
        return (p - q).abs().sum(-1) / 2
    raise ValueError(f"unknown divergence {kind!r}")
