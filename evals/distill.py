"""``reasonspec distill``: fine-tune a draft toward its target on a dataset's prompts (DistillSpec, AdaSPEC).

Every speculative policy here is only as fast as the small model agrees with the
large one; this command raises that agreement, offline, with plain torch and
transformers. Per step, a batch of prompts becomes token sequences, the teacher
(the large model) and the student (the draft) read every response position, and
the student takes a gradient step on the chosen divergence between them
(``orchestrator.distill``: forward KL, reverse KL, TVD, JSD).

- **Data** (DistillSpec's comparison; model-generated data beats fixed text, on-policy
  best for greedy GSM8K): ``onpolicy`` samples the student's own continuations each
  step (``temperature``; seeded per step), ``fixed`` uses the teacher's greedy
  continuations, generated once.
- **AdaSPEC** (``reference``): a reference model of the draft's size, distilled from
  the teacher beforehand (stage 1: this command with ``--divergence fkl``), scores every
  token; the loss keeps the ``keep_fraction`` (k = 0.4 in the paper) of tokens with the
  largest L_draft - L_ref and averages L_draft over them.
- **Held out**: the teacher's greedy continuations of held-out prompts (arith: the
  val split, so the test split stays for evals; other datasets: the last
  ``heldout`` problems loaded). Before and after training: each divergence averaged
  over their positions, and greedy agreement (the per-token acceptance of greedy
  speculative decoding with this draft).
- **Output**: a standard Hugging Face folder (weights, tokenizer and chat template,
  generation config), ``distill.json`` (settings, history, measurements) and a
  ``README.md`` model card; ``checkpoint.pt`` in the same folder (student, optimizer,
  step, data) every ``save_every`` steps. Randomness is a function of (seed, step):
  the batch order (a seeded permutation per epoch) and the on-policy samples, so a
  resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoModelForCausalLM, AutoTokenizer

from evals.datasets import DatasetError, load_dataset
from evals.progress import progress_bar
from orchestrator.config import resolve_model_path
from orchestrator.distill import DIVERGENCES, Divergence, distill_loss, divergence, greedy_agreement, position_logprobs
from orchestrator.prompting import prompt_ids, to_messages
from workers.protocol import vocab_fingerprint

CHECKPOINT = "checkpoint.pt"
SUMMARY = "distill.json"
#: Sequences per generation call (prompts are left-padded together).
GEN_BATCH = 32


class DistillError(ValueError):
    """A distillation that cannot run as asked (mismatched vocabularies, a folder holding another run)."""


class DistillSettings(BaseModel):
    """Everything that decides a distillation run (saved with its checkpoint: a resume must match)."""

    model_config = ConfigDict(extra="forbid")

    student: str = Field(description="the draft's model folder (the starting point)")
    teacher: str = Field(description="the target's model folder")
    out: str = Field(description="output folder: the distilled model, its card and the checkpoint")
    dataset: str = "arith"
    dataset_path: str | None = None
    split: str | None = Field(None, description="training split (arith: train by default)")
    problems: int = Field(256, ge=1, description="training prompts")
    heldout: int = Field(16, ge=1, description="held-out prompts measured before and after")
    data: Literal["onpolicy", "fixed"] = "onpolicy"
    divergence: Divergence = "fkl"
    reference: str | None = Field(None, description="AdaSPEC: the reference model folder (enables token filtering)")
    keep_fraction: float = Field(0.4, gt=0, le=1, description="AdaSPEC: fraction of tokens trained on")
    steps: int = Field(300, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-4, gt=0)
    warmup: int = Field(10, ge=0, description="steps of linear learning-rate warmup (constant after)")
    max_new_tokens: int = Field(256, ge=1, description="length of generated continuations")
    temperature: float = Field(1.0, ge=0, description="on-policy sampling temperature (0: the student's greedy)")
    seed: int = 0
    device: str = "auto"
    threads: int | None = Field(None, ge=1, description="CPU threads (None: torch's default)")
    save_every: int = Field(50, ge=1)


# ---------------------------------------------------------------- data


def _prompts(s: DistillSettings, tokenizer: Any) -> tuple[list[list[int]], list[list[int]]]:
    """Training and held-out prompt ids, chat-templated exactly as the orchestrator prompts the models."""
    if s.dataset == "arith" and s.dataset_path is None:
        if s.split == "val":
            raise DistillError("arith's val split is the held-out set; train on train (or test)")
        train = load_dataset("arith", split=s.split or "train", limit=s.problems)
        held = load_dataset("arith", split="val", limit=s.heldout)
    else:
        rows = load_dataset(s.dataset, path=s.dataset_path, split=s.split, limit=s.problems + s.heldout)
        if len(rows) <= s.heldout:
            raise DatasetError(f"{s.dataset}: {len(rows)} problems leave none to train on after {s.heldout} held out")
        train, held = rows[: -s.heldout], rows[-s.heldout :]

    def ids(problems: list) -> list[list[int]]:
        return [prompt_ids(tokenizer, to_messages(p.problem)) for p in problems]

    return ids(train), ids(held)


@torch.no_grad()
def generate(model: Any, prompts: list[list[int]], max_new_tokens: int, temperature: float, pad_id: int,
             eos_ids: set[int]) -> list[list[int]]:
    """Each prompt continued (left-padded batches; sampling draws from torch's global RNG, seeded by the caller).

    A continuation ends after its first EOS (kept: the draft must learn to stop too).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    for b in range(0, len(prompts), GEN_BATCH):
        chunk = prompts[b : b + GEN_BATCH]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        sample = temperature > 0
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=sample, temperature=temperature if sample else None, top_k=0 if sample else None,
                             top_p=1.0 if sample else None, pad_token_id=pad_id)
        for p, row in zip(chunk, gen[:, width:].tolist()):
            end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
            out.append(p + row[:end])
    model.train(was_training)
    return out


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """The prompts of ``step``: consecutive slices of a seeded permutation per epoch (a function of the step)."""
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perm[i]))
    return out


def _response_positions(seqs: list[list[int]], prompts: list[list[int]]) -> list[list[int]]:
    return [list(range(len(p), len(s))) for s, p in zip(seqs, prompts)]


# ---------------------------------------------------------------- measurement


@torch.no_grad()
def measure(student: Any, teacher: Any, seqs: list[list[int]], starts: list[int], pad_id: int) -> dict[str, float]:
    """On held-out sequences: each divergence averaged over response positions, and greedy agreement."""
    was = student.training
    student.eval()
    sums = dict.fromkeys(DIVERGENCES, 0.0)
    count = 0
    for b in range(0, len(seqs), 16):
        chunk = seqs[b : b + 16]
        pos = [list(range(s, len(q))) for q, s in zip(chunk, starts[b : b + 16])]
        t = position_logprobs(teacher, chunk, pos, pad_id)
        q = position_logprobs(student, chunk, pos, pad_id).to(t.device)
        for k in DIVERGENCES:
            sums[k] += float(divergence(k, t, q).sum())
        count += len(t)
    hit, total = greedy_agreement(student, seqs, starts, pad_id)
    student.train(was)
    return {**{k: round(v / max(count, 1), 5) for k, v in sums.items()}, "agreement": round(hit / max(total, 1), 4),
            "positions": count}


# ---------------------------------------------------------------- the run


def _load(path: str, device: torch.device) -> Any:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)


def _eos(model: Any, tokenizer: Any) -> set[int]:
    ids = set()
    for src in (model.generation_config.eos_token_id if model.generation_config else None, tokenizer.eos_token_id):
        ids.update([src] if isinstance(src, int) else (src or []))
    return ids


def _save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / CHECKPOINT)  # a crash mid-write leaves the previous checkpoint whole


def run_distill(s: DistillSettings, *, resume: bool = False, overwrite: bool = False, stop_at: int | None = None,
                show_progress: bool = True) -> dict[str, Any]:
    """Distil ``s.student`` toward ``s.teacher``; returns the summary written to ``OUT/distill.json``.

    ``stop_at``: leave after that many steps with the checkpoint written (an interruption, for tests).
    """
    t_start = time.perf_counter()
    if s.threads:
        torch.set_num_threads(s.threads)
    device = torch.device("cuda" if s.device == "auto" and torch.cuda.is_available() else
                          "cpu" if s.device == "auto" else s.device)
    student_path, teacher_path = resolve_model_path(s.student), resolve_model_path(s.teacher)
    out = Path(s.out)
    ckpt_path = out / CHECKPOINT
    state: dict[str, Any] | None = None
    if ckpt_path.exists() and not overwrite:
        if not resume:
            raise DistillError(f"{out} holds a distillation checkpoint: --resume continues it, --overwrite restarts")
        state = torch.load(ckpt_path, weights_only=False, map_location="cpu")  # moved to the device on load
        if state["settings"] != s.model_dump():
            changed = sorted(k for k, v in s.model_dump().items() if state["settings"].get(k) != v)
            raise DistillError(f"{out} holds a run with other settings ({', '.join(changed)} differ)")
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(student_path)
    if vocab_fingerprint(tokenizer) != vocab_fingerprint(AutoTokenizer.from_pretrained(teacher_path)):
        raise DistillError(f"{s.student} and {s.teacher} have different vocabularies; token-level distillation "
                           "compares their distributions token by token and needs one")
    student, teacher = _load(student_path, device), _load(teacher_path, device).eval()
    reference = _load(resolve_model_path(s.reference), device).eval() if s.reference else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = _eos(teacher, tokenizer)
    opt = torch.optim.AdamW(student.parameters(), lr=s.lr)

    if state is None:
        train_prompts, held_prompts = _prompts(s, tokenizer)
        held = generate(teacher, held_prompts, s.max_new_tokens, 0.0, pad, eos)
        fixed = generate(teacher, train_prompts, s.max_new_tokens, 0.0, pad, eos) if s.data == "fixed" else None
        state = {"settings": s.model_dump(), "step": 0, "history": [], "train_s": 0.0,
                 "train_prompts": train_prompts, "held": held, "held_starts": [len(p) for p in held_prompts],
                 "fixed": fixed,
                 "before": measure(student, teacher, held, [len(p) for p in held_prompts], pad)}
    else:
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
    train_prompts, fixed = state["train_prompts"], state["fixed"]

    student.train()
    bar = progress_bar(s.steps, initial=state["step"], desc="distill", unit="step", every=max(1, s.steps // 10),
                       disable=not show_progress)
    try:
        while state["step"] < s.steps:
            step, t_step = state["step"], time.perf_counter()
            idx = batch_indices(step, len(train_prompts), s.batch_size, s.seed)
            prompts = [train_prompts[i] for i in idx]
            if fixed is not None:
                seqs = [fixed[i] for i in idx]
            else:
                torch.manual_seed(s.seed * 1_000_003 + step)  # the step's samples, whatever ran before
                seqs = generate(student, prompts, s.max_new_tokens, s.temperature, pad, eos)
            positions = _response_positions(seqs, prompts)
            keep = [i for i, p in enumerate(positions) if p]
            seqs, positions = [seqs[i] for i in keep], [positions[i] for i in keep]
            with torch.no_grad():
                t_logp = position_logprobs(teacher, seqs, positions, pad)
                r_logp = position_logprobs(reference, seqs, positions, pad) if reference is not None else None
            q_logp = position_logprobs(student, seqs, positions, pad)
            loss, kept = distill_loss(q_logp, t_logp, s.divergence, r_logp, s.keep_fraction)
            for g in opt.param_groups:
                g["lr"] = s.lr * min(1.0, (step + 1) / (s.warmup + 1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            state["step"] = step + 1
            state["train_s"] += time.perf_counter() - t_step
            state["history"].append({"step": step + 1, "loss": round(loss.item(), 5), "tokens": kept})
            bar.set_postfix_str(f"{s.divergence} {loss.item():.4f}")
            bar.update(1)
            if state["step"] % s.save_every == 0 or state["step"] == s.steps or state["step"] == stop_at:
                _save_checkpoint(out, {**state, "student": student.state_dict(), "optimizer": opt.state_dict()})
            if stop_at is not None and state["step"] >= stop_at and state["step"] < s.steps:
                return {"stopped_at": state["step"]}
    finally:
        bar.close()

    after = measure(student, teacher, state["held"], state["held_starts"], pad)
    summary = {"settings": s.model_dump(), "steps": state["step"], "heldout_before": state["before"],
               "heldout_after": after, "final_loss": state["history"][-1]["loss"] if state["history"] else None,
               "train_s": round(state["train_s"], 1), "seconds_this_run": round(time.perf_counter() - t_start, 1),
               "device": str(device), "threads": torch.get_num_threads() if device.type == "cpu" else None,
               "history": state["history"]}
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    (out / "README.md").write_text(model_card(summary), encoding="utf-8")
    return summary


def model_card(summary: dict[str, Any]) -> str:
    s, before, after = summary["settings"], summary["heldout_before"], summary["heldout_after"]
    data = ("on-policy: the student's own samples (temperature "
            f"{s['temperature']}) scored by the teacher" if s["data"] == "onpolicy"
            else "fixed: the teacher's greedy continuations")
    ada = (f"AdaSPEC token filtering with reference `{s['reference']}`: the {s['keep_fraction']:.0%} of tokens "
           "with the largest L_draft - L_ref are trained on" if s["reference"] else "all response tokens")
    rows = "\n".join(f"| {k} | {before[k]} | {after[k]} |" for k in (*DIVERGENCES, "agreement"))
    return f"""# {Path(s['out']).name}

A draft model distilled by `reasonspec distill` (reasonspec, `evals/distill.py`): `{s['student']}`
fine-tuned toward `{s['teacher']}` so that speculative policies accept more of its tokens.

- divergence: {s['divergence']} (teacher p, draft q); {ada}
- data: {data}; dataset {s['dataset']}{f" ({s['dataset_path']})" if s['dataset_path'] else ""}, \
{s['problems']} training prompts, continuations up to {s['max_new_tokens']} tokens
- training: {summary['steps']} steps of batch {s['batch_size']}, AdamW lr {s['lr']} (linear warmup
  {s['warmup']} steps, then constant), gradient clip 1.0, seed {s['seed']}; {summary['train_s']} s on
  {summary['device']}{f" ({summary['threads']} threads)" if summary['threads'] else ""}; final loss
  {summary['final_loss']}

## Held out

{s['heldout']} held-out prompts (arith: the val split), the teacher's greedy continuations, {after['positions']}
positions. Divergences are averaged per position; agreement is the fraction of positions where the draft's
argmax is the teacher's token (the per-token acceptance of greedy speculative decoding).

| measure | before | after |
|---|---|---|
{rows}
"""
