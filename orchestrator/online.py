"""Online draft adaptation: Online Speculative Decoding (Liu et al., ICML 2024) while an eval or a server runs.

A token-level policy (``speculative``, ``consultant``) wastes a round wherever the
draft is rejected. Those positions are exactly what the draft should learn, and a
serving system sees them for free. The loop, with OSD's defaults (interval 8, one
gradient step, lr 1e-4, forward KL at the wrong positions only):

1. **Record.** The session keeps the position of every token that replaced a
   rejected draft token (``Session.draft_misses``, O(1) per round). When a request
   ends, the orchestrator hands its large-model token log and those positions to
   ``OnlineAdapter.observe``: one copy of the chain per request, none per round.
   Every ``holdout_every``-th request is held out instead (the gate's data).
2. **Distil in the background.** When ``interval`` requests with misses are
   buffered, a task asks the large worker for its distribution at every position of
   each buffered chain (one ``score`` pass with ``teacher_top_k`` alternatives, its
   prefix mostly cached: the worker has just served that chain; ``teacher_top_k: 0``
   uses the large model's token alone), then, in a thread (the event loop keeps
   serving), takes ``steps`` gradient steps of forward KL on the misses with a
   training copy of the draft (``orchestrator.distill``, the loss ``reasonspec
   distill`` uses).
3. **Gate.** The candidate is kept only if its measured acceptance on the held-out
   requests does not fall: greedy agreement with the large model's tokens (on
   chains the target wrote greedily, the per-token acceptance of greedy speculative
   decoding), candidate against the serving draft on the same chains, within
   ``tolerance``. A rejected candidate is discarded and training restarts from the
   serving weights.
4. **Swap atomically.** ``HFWorker.swap_model`` installs the new draft between engine
   rounds: admitted requests finish on the old weights, the prefix cache (old KV) is
   dropped, and new requests run on the new weights only. Verification is unchanged,
   so outputs stay exactly what the policy's rule makes them (lossless speculative
   decoding still equals LargeOnly under greedy decoding).
5. **Watch live.** Acceptance is also counted per draft version over the requests it
   served wholly; once a new version has ``live_window`` drafted tokens, it is
   reverted to the previous draft if its live acceptance fell by more than
   ``tolerance`` (``live_window: 0`` turns this off; live traffic differs between
   versions, so the gate above is the primary test).

The draft must be an in-process hf worker (the weights are swapped inside it); the
policy must be token level (a shared vocabulary: the large model's positions are
the draft's). ``report()`` gives the updates, gate numbers and live acceptance.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from orchestrator.config import ConfigError, OnlineConfig
from orchestrator.distill import distill_loss, greedy_agreement, onehot_logp, position_logprobs, sparse_logp

if TYPE_CHECKING:
    from orchestrator.session import ModelHandle, Session
    from policies.base import Policy

log = logging.getLogger(__name__)


@dataclass
class Observed:
    """One finished request: the large model's token log, where its reasoning starts, and the draft misses."""

    ids: list[int]
    start: int
    misses: list[int]


class OnlineAdapter:
    """Buffers draft misses, distils the draft on them in the background and swaps it in when it is no worse."""

    def __init__(self, cfg: OnlineConfig, models: dict[str, ModelHandle], policy: Policy):
        from policies.token_level import DraftVerifyPolicy

        if not isinstance(policy, DraftVerifyPolicy):
            raise ConfigError(f"online adaptation needs a token-level policy (speculative, consultant), "
                              f"not {policy.name}: only those reject draft tokens against the large model")
        self.cfg = cfg
        self.small, self.large = models["small"].worker, models["large"].worker
        served = getattr(self.small, "model", None)
        if not hasattr(self.small, "swap_model") or not isinstance(served, torch.nn.Module):
            raise ConfigError("online adaptation needs the small model on the hf backend in this process "
                              "(its weights are swapped inside the worker)")
        self.pad_id = getattr(self.small, "pad_id", 0)
        self.vocab = served.config.vocab_size
        self._dtype = next(served.parameters()).dtype
        self._train = copy.deepcopy(served).float().train()  # the training copy; the worker serves its own
        self._opt = torch.optim.AdamW(self._train.parameters(), lr=cfg.lr)
        self.buffer: list[Observed] = []
        self.holdout: deque[Observed] = deque(maxlen=cfg.holdout_requests)
        self.version = 0
        self.updates: list[dict[str, Any]] = []
        self.live: dict[int, list[int]] = {0: [0, 0]}  # version -> [drafted, accepted] over requests it served wholly
        self._previous: torch.nn.Module | None = None  # the draft before the last swap (a live revert restores it)
        self._watching = False  # a new version awaits its live check
        self._seen = 0
        self._lock = asyncio.Lock()  # one update or revert at a time
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------ the orchestrator's hook

    def observe(self, session: Session, version: int) -> None:
        """A finished request that started under draft ``version``; may start an update or a revert."""
        m = session.metrics
        if version == self.version and m.proposed:
            self.live[version][0] += m.proposed
            self.live[version][1] += m.accepted
        self._seen += 1
        item = Observed(session.ids("large"), len(session.prompt_ids["large"]), list(session.draft_misses))
        if self._seen % self.cfg.holdout_every == 0:
            self.holdout.append(item)
        elif item.misses:
            self.buffer = (self.buffer + [item])[-self.cfg.buffer_requests :]
        if self._lock.locked():
            return
        if self._live_fell():
            self._spawn(self._revert())
        elif len(self.buffer) >= self.cfg.interval and self.holdout:
            self._spawn(self._update())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for the running update (tests, and a clean report at the end of an eval)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def rate(self, version: int) -> float | None:
        drafted, accepted = self.live.get(version, (0, 0))
        return accepted / drafted if drafted else None

    def summary_line(self) -> str:
        """The adaptation in one line (an eval summary's table)."""
        ups = [u for u in self.updates if "swapped" in u]
        reverts = sum(bool(u.get("reverted")) for u in self.updates)
        rates = ", ".join(f"v{v} {r:.3f}" for v in self.live if (r := self.rate(v)) is not None)
        return (f"{len(ups)} updates, {sum(u['swapped'] for u in ups)} swapped, {reverts} reverted; "
                f"live acceptance {rates or '-'}")

    def report(self) -> dict[str, Any]:
        return {"version": self.version, "updates": self.updates,
                "live_acceptance": {v: self.rate(v) for v in self.live}, "buffered": len(self.buffer),
                "held_out": len(self.holdout)}

    # ------------------------------------------------------------ background work

    async def _update(self) -> None:
        async with self._lock:
            batch, self.buffer = self.buffer, []
            record: dict[str, Any] = {"requests": len(batch), "positions": sum(len(b.misses) for b in batch)}
            try:
                teacher = torch.cat([await self._teacher_rows(b) for b in batch])
                out = await asyncio.to_thread(self._train_and_gate, batch, teacher, list(self.holdout))
                record.update({k: v for k, v in out.items() if k != "model"})
                if out["model"] is not None:
                    previous = await self.small.swap_model(out["model"])
                    self._previous, self._watching = previous, self.cfg.live_window > 0
                    self.version += 1
                    self.live[self.version] = [0, 0]
                record["version"] = self.version
            except Exception as e:  # adaptation must never take serving down
                log.exception("online draft update failed")
                record["error"] = repr(e)
            self.updates.append(record)

    async def _teacher_rows(self, b: Observed) -> torch.Tensor:
        """The large model's log-distribution at each miss of ``b`` (top-k renormalised, or its token)."""
        k = self.cfg.teacher_top_k
        if k == 0:
            return torch.stack([onehot_logp(b.ids[p], self.vocab) for p in b.misses])
        s = await self.large.score(b.ids[: b.start], b.ids[b.start : max(b.misses) + 1], top_k=k)
        return torch.stack([sparse_logp(s.top[p - b.start], self.vocab) for p in b.misses])

    def _train_and_gate(self, batch: list[Observed], teacher: torch.Tensor,
                        holdout: list[Observed]) -> dict[str, Any]:
        """In a thread: ``steps`` forward-KL steps on the misses, then the held-out gate."""
        t0 = time.perf_counter()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        before = copy.deepcopy(self._train).eval()
        seqs, positions = [b.ids for b in batch], [b.misses for b in batch]
        losses = []
        for _ in range(self.cfg.steps):
            student = position_logprobs(self._train, seqs, positions, self.pad_id)
            loss, _ = distill_loss(student, teacher, "fkl")
            self._opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self._train.parameters(), 1.0)
            self._opt.step()
            losses.append(loss.item())
        self._train.eval()
        hseqs, hstarts = [h.ids for h in holdout], [h.start for h in holdout]
        old_hit, n = greedy_agreement(before, hseqs, hstarts, self.pad_id)
        new_hit, _ = greedy_agreement(self._train, hseqs, hstarts, self.pad_id)
        self._train.train()
        old, new = old_hit / max(n, 1), new_hit / max(n, 1)
        keep = new >= old - self.cfg.tolerance
        if keep:
            model = copy.deepcopy(self._train).to(self._dtype).eval()
        else:  # back to the serving weights (and forget what the optimizer learned from the update)
            model = None
            self._train.load_state_dict(before.state_dict())
            self._opt = torch.optim.AdamW(self._train.parameters(), lr=self.cfg.lr)
        return {"loss_first": losses[0], "loss_last": losses[-1], "gate_positions": n,
                "gate_before": round(old, 4), "gate_after": round(new, 4), "swapped": keep, "model": model,
                "train_s": round(time.perf_counter() - t0, 3)}

    def _live_fell(self) -> bool:
        """Whether the newest version has been watched for ``live_window`` tokens and its acceptance fell."""
        if not self._watching or self._previous is None or self.live[self.version][0] < self.cfg.live_window:
            return False
        self._watching = False
        new, old = self.rate(self.version), self.rate(self.version - 1)
        return new is not None and old is not None and new < old - self.cfg.tolerance

    async def _revert(self) -> None:
        async with self._lock:
            previous, self._previous = self._previous, None
            if previous is None:
                return
            fell_from = self.rate(self.version - 1)
            await self.small.swap_model(previous)
            self._train.load_state_dict({k: v.float() for k, v in previous.state_dict().items()})
            self._opt = torch.optim.AdamW(self._train.parameters(), lr=self.cfg.lr)
            self.version += 1
            self.live[self.version] = [0, 0]
            self.updates.append({"reverted": True, "live_before": fell_from, "live_after": self.rate(self.version - 1),
                                 "version": self.version})
