"""Draft distillation: the losses and measurements shared by ``reasonspec distill`` and online adaptation.

A speculative method is as fast as its draft agrees with the target, so the draft is
trained toward the target's next-token distributions at chosen positions of token
sequences (DistillSpec, Zhou et al. 2024; Online Speculative Decoding, Liu et al.
2024). Two callers use one mechanism:

- ``evals.distill`` (the ``reasonspec distill`` command): offline, on a dataset's
  prompts, the teacher run locally, any divergence, optionally AdaSPEC's token
  filter with a reference model;
- ``orchestrator.online``: during serving, the positions where the draft was
  rejected, the teacher's distribution read from the large worker.

A *position* is the index, in a sequence, of the token being predicted: the
distribution there is the model's output after ``seq[:position]``. Teacher
distributions arrive as log-probability rows (dense, or sparse with ``-inf``
outside a top-k) so that both callers share the loss.

Divergences (each per position, summed over the vocabulary; p the teacher, q the draft):
forward KL(p||q) (mass-covering; OSD's loss, AdaSPEC's), reverse KL(q||p)
(mode-seeking), total variation 0.5*sum|p-q| (1 - TV is the acceptance probability
of lossless speculative sampling, DistillSpec's motivation), and the true
Jensen-Shannon divergence with the mixture m = (p+q)/2 (OSD's code calls
0.9*FKL + 0.1*RKL "jsd"; this is the textbook one). They are computed from
log-probabilities, in the training dtype: a float32 softmax underflows to q = 0 on
a real vocabulary, and log(q) from such probabilities would make the loss and its
gradient infinite (the acceptance rules' divergences in ``policies`` read
probabilities in double precision and carry no gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

Divergence = Literal["fkl", "rkl", "tvd", "jsd"]
DIVERGENCES: tuple[str, ...] = ("fkl", "rkl", "tvd", "jsd")


def _plogp_diff(p: torch.Tensor, lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """sum_v p * (log p - log q), with 0 * anything = 0 (a sparse teacher has -inf where p = 0)."""
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


def divergence(kind: str, teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Per-row divergence between teacher and student log-probability rows ``[N, V]`` -> ``[N]``."""
    p, q = teacher_logp.exp(), student_logp.exp()
    if kind == "fkl":
        return _plogp_diff(p, teacher_logp, student_logp)
    if kind == "rkl":
        return _plogp_diff(q, student_logp, teacher_logp)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "jsd":
        m = 0.5 * (p + q)
        lm = m.clamp_min(torch.finfo(m.dtype).tiny).log()
        return 0.5 * _plogp_diff(p, teacher_logp, lm) + 0.5 * _plogp_diff(q, student_logp, lm)
    raise ValueError(f"unknown divergence {kind!r}; use one of {', '.join(DIVERGENCES)}")


def adaspec_keep(draft_loss: torch.Tensor, ref_loss: torch.Tensor, fraction: float) -> torch.Tensor:
    """AdaSPEC's token filter: keep the ``fraction`` of tokens the draft is furthest behind the reference on.

    With dL = L_draft - L_ref per token, tokens with dL at or above the (1 - fraction)
    quantile are kept (Hu et al. 2025; fraction k = 0.4 in every task of the paper).
    A large dL marks a token the draft *can* still learn (the reference, a model of
    the same size already distilled, fits it); tokens hard even for the reference are
    left out, so the draft's capacity goes where acceptance can improve.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"the AdaSPEC keep fraction must be in (0, 1], got {fraction}")
    delta = (draft_loss - ref_loss).detach().float()
    if delta.numel() == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    threshold = torch.quantile(delta, 1.0 - fraction)
    return delta >= threshold


def position_logprobs(model: torch.nn.Module, seqs: Sequence[Sequence[int]],
                      positions: Sequence[Sequence[int]], pad_id: int = 0) -> torch.Tensor:
    """The model's log-distribution at each position of each sequence, stacked ``[sum(len(positions)), V]``.

    One right-padded forward pass over the batch. Logits are computed only at the
    columns some row reads (``logits_to_keep`` as indices): online adaptation reads a
    few positions of long chains, and a full ``tokens x vocabulary`` matrix of a real
    model is gigabytes. Runs with the caller's grad mode: the student's rows carry
    gradients, the teacher's do not.
    """
    device = next(model.parameters()).device
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols = [], []
    for i, (s, pos) in enumerate(zip(seqs, positions)):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
        if any(not 0 < p < len(s) for p in pos):
            raise ValueError(f"positions must lie in 1..{len(s) - 1} for a sequence of {len(s)} tokens")
        rows += [i] * len(pos)
        cols += [p - 1 for p in pos]  # the logits after token p-1 predict token p
    needed = sorted(set(cols))
    column = {c: j for j, c in enumerate(needed)}
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                   logits_to_keep=torch.tensor(needed, device=device)).logits
    picked = logits[torch.tensor(rows, device=device), torch.tensor([column[c] for c in cols], device=device)]
    return torch.log_softmax(picked.float(), -1)


def sparse_logp(top: dict[int, float], vocab: int) -> torch.Tensor:
    """A teacher row from its top-k log-probabilities: renormalised over them, ``-inf`` elsewhere."""
    row = torch.full((vocab,), float("-inf"))
    row[torch.tensor(list(top))] = torch.tensor(list(top.values()), dtype=torch.float32)
    return torch.log_softmax(row, -1)


def onehot_logp(token: int, vocab: int) -> torch.Tensor:
    """A hard teacher row (the large model's token only): forward KL against it is cross-entropy."""
    row = torch.full((vocab,), float("-inf"))
    row[token] = 0.0
    return row


def distill_loss(student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str,
                 ref_logp: torch.Tensor | None = None, keep_fraction: float | None = None,
                 ) -> tuple[torch.Tensor, int]:
    """The mean divergence over the positions trained on, and how many that is.

    With a reference (AdaSPEC) only the positions ``adaspec_keep`` selects count;
    the reference's loss uses the same divergence as the draft's (with ``fkl`` this
    is exactly the paper's rule).
    """
    per = divergence(kind, teacher_logp.to(student_logp.device), student_logp)
    if ref_logp is not None:
        ref = divergence(kind, teacher_logp.to(ref_logp.device), ref_logp).to(per.device)
        keep = adaspec_keep(per, ref, keep_fraction if keep_fraction is not None else 0.4)
        per = per[keep]
    return (per.mean() if per.numel() else student_logp.sum() * 0.0), int(per.numel())


@torch.no_grad()
def greedy_agreement(model: torch.nn.Module, seqs: Sequence[Sequence[int]], starts: Sequence[int],
                     pad_id: int = 0, batch_size: int = 16) -> tuple[int, int]:
    """(positions where the model's argmax is the sequence's next token, positions) after each start.

    On sequences the target wrote greedily this is the per-token acceptance of greedy
    speculative decoding with this draft: the measure online adaptation gates on and
    the distill command reports.
    """
    hit = total = 0
    for b in range(0, len(seqs), batch_size):
        chunk, st = seqs[b : b + batch_size], starts[b : b + batch_size]
        positions = [list(range(s, len(q))) for q, s in zip(chunk, st)]
        if not any(positions):
            continue
        keep = [i for i, p in enumerate(positions) if p]
        lp = position_logprobs(model, [chunk[i] for i in keep], [positions[i] for i in keep], pad_id)
        want = torch.tensor([chunk[i][p] for i in keep for p in positions[i]], device=lp.device)
        hit += int((lp.argmax(-1) == want).sum())
        total += len(want)
    return hit, total
