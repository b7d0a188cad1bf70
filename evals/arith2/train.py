"""Train the second-generation arith models from scratch: ``python -m evals.arith2.train``.

Three Llama-layout causal LMs (small, mid, large) share one tokenizer
(`evals.arith2.tokenizer`, built from the chain corpus on first use) and the
first generation's training loop (`evals.arith.train.fit`: seeded, resumable from
``OUT/.ckpt/NAME.pt``, tqdm bar, held-out evaluation logged to
``OUT/train-NAME.jsonl``, early stop on the validation split). The small model
learns the ``SMALL`` chain style (hesitates where it errs), mid and large the
``CAREFUL`` style (every operation worked column by column before its result). Each solution is tokenized *whole*, as the model will see its
own text, with loss on the assistant's tokens except those of injected wrong
steps (`evals.arith2.chains`). Sizes: the large one is deep (a CPU decode step
costs per layer at this scale, which gives the decode-time ratio) and narrow
(to keep its training within budget); measured by `evals.arith2.speed`.
The tokenizer is trained on ``SMALL`` and ``LARGE`` chains, whose phrases
``CAREFUL`` shares, so the small model and tokenizer of the first try stay.

The prompt judge (large model only), a route not tried before. Earlier ones
(co-training on 25% synthetic judge examples, judge-heavy fine-tunes, re-weighted
retraining) all showed candidates made by corrupting the generator's own steps:
the last reached 0.67 AUROC on such candidates but 0.48 on steps the small
model wrote, so the judge learned the corruption style rather than re-checking.
This route trains on *the small model's own steps*:

- on-policy, dense labels: the trained small model (``OUT/small``, so train it
  first) solves train-split problems greedily; every step of every solution up
  to its first error becomes a judge example, labelled by exact arithmetic
  (`chains.label_steps`); before a small model exists, SMALL-style chains with
  their injected errors stand in (smoke runs);
- contrastive twins: each correct candidate comes with a twin in the same batch,
  the same context and step with one number changed so that it is wrong, so the
  only feature that separates the two scores is the step's correctness;
- curriculum: no judge examples in the first 30% of training (a model that
  cannot compute yet cannot check), then a linear ramp to ``judge_share`` of the
  rows by 50%; the judge tokens carry that same share of the loss (one score
  token would otherwise weigh as much as one of the ~300 tokens of a chain).

The score stays a single-token read after the standard judge suffix
(`policies.judge_prompt`): 9 for a correct step, 0 for a wrong one. Held-out
judge AUROC (validation split, same pool kind) is logged at every evaluation.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evals.arith.measure import auroc
from evals.arith.problems import ArithGenerator, ArithProblem, random_problem
from evals.arith.train import (
    BOXED, TRAIN_MIX, ExampleEncoder, ModelSpec, build_model, collate, fit, greedy_texts, train_problem,
)
from evals.arith2.chains import (
    CAREFUL, LARGE, NOT_NUMBER, NUMBER, SMALL, STEP_SEP, ChainStep, ChainStyle, chain, chain_text, handoff_chain, label_steps,
)
from evals.arith2.tokenizer import build_tokenizer
from orchestrator.prompting import user_message
from policies.judge_prompt import DEFAULT_INSTRUCTION, DEFAULT_PREFILL
from policies.spec_thinking import SpecThinkingParams, classify

DEFAULT_OUT = Path(__file__).parent / "models"
MAX_NEW_TOKENS = 1024  # the longest large-style chains at the default difficulty are ~800 tokens

# Measured by `evals.arith2.speed` (random weights, this CPU): a decode step costs ~0.5 ms plus ~0.25 ms per layer at
# these widths, nearly independent of the width, so the decode-time ratio comes from depth (12 vs 2 layers: ~4.7x)
# and the models are narrow to keep training within budget (CAREFUL chains average ~530 tokens). Head size 32
# everywhere: vLLM's CPU attention supports 32, 64, 80, 96, ... (not 24). The first try, a 20-layer large model on
# LARGE-style chains, reached 0.50 accuracy in 92 minutes: depth bought speed ratio, not arithmetic. The shipped
# large model ran 1050 steps under a 1300-step schedule, then resumed to 1700 (``--max-steps 1700``).
SPECS = {
    "small": ModelSpec(layers=2, hidden=128, ffn=384, heads=4, judge_share=0.0, max_steps=1500, lr=2e-3, stop_at_val_acc=0.5),
    "mid": ModelSpec(layers=7, hidden=96, ffn=256, heads=3, judge_share=0.0, max_steps=1500, lr=2e-3, stop_at_val_acc=0.8),
    "large": ModelSpec(layers=12, hidden=96, ffn=256, heads=3, judge_share=0.25, max_steps=1700, lr=1.5e-3,
                       stop_at_val_acc=0.95),
}
STYLES: dict[str, ChainStyle] = {"small": SMALL, "mid": CAREFUL, "large": CAREFUL}


@dataclass(frozen=True)
class Handoff:
    """A continuation stage (``--handoff``): the trained model continues training on handoff rows.

    Trained on its own style only, the large model fails on text the small one began (Speculative Thinking
    0/30, SpecReason with the prompt judge 2/30 on arith2): it has never seen a SMALL-style step before its
    own. A stage starts from the shipped weights, warms up again to ``lr`` and mixes ``share`` of the
    solution rows as `chains.handoff_chain` (a SMALL prefix, not trained on, continued in the model's style),
    judge rows at their full share from the start. Each ``--handoff`` run trains the next stage of
    ``HANDOFF[name]`` that the folder's ``training.json`` has not recorded yet, on a fresh data stream.
    """

    steps: int
    lr: float
    share: float


# The shipped large model's first handoff stage ran 1200 steps under a 1200-step schedule, then resumed to 2000
# (``--max-steps 2000``); it left held-out accuracy at 0.775 and rising, so a second stage polishes at a lower rate
# (0.835 after it), a third at half that rate again (0.890), and a short fourth at half of that.
HANDOFF = {
    "large": (
        Handoff(steps=2000, lr=1e-3, share=0.5),
        Handoff(steps=1700, lr=5e-4, share=0.5),
        Handoff(steps=1800, lr=2.5e-4, share=0.5),
        Handoff(steps=1000, lr=1.25e-4, share=0.5),
    )
}
JUDGE_START, JUDGE_FULL = 0.3, 0.5  # curriculum: fractions of training where judge rows start and reach judge_share
CUES = SpecThinkingParams()


def tokenizer_corpus(seed: int = 1234, n: int = 3000) -> list[str]:
    """Chains of both styles over the training mix, the user turn and the judging format."""
    rng = random.Random(seed)
    corpus = []
    for i in range(n):
        p = random_problem(rng, rng.choice(list(TRAIN_MIX)))
        corpus.append(user_message(p.text))
        corpus.append(chain_text(chain(p, rng, SMALL if i % 2 else LARGE)))
    return corpus + [DEFAULT_INSTRUCTION, DEFAULT_PREFILL] * (n // 10)


def load_or_build_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    path = out / "tokenizer"
    if path.exists():
        return PreTrainedTokenizerFast.from_pretrained(path)
    tok = build_tokenizer(tokenizer_corpus())
    tok.save_pretrained(path)
    return tok


@dataclass(frozen=True)
class Candidate:
    """A step to judge in its context, with its exact label."""

    problem: ArithProblem
    context: tuple[str, ...]
    step: str
    ok: bool


class ChainEncoder(ExampleEncoder):
    """Solutions tokenized whole (merges across step boundaries as at inference) and judge rows."""

    def __init__(self, tok: PreTrainedTokenizerFast, style: ChainStyle, handoff: float = 0.0):
        super().__init__(tok)
        self.style, self.handoff = style, handoff

    def steps(self, problem: ArithProblem, steps: list[ChainStep]) -> tuple[list[int], list[int]]:
        text = chain_text(steps)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        masked, pos = [], 0
        for s in steps:
            end = pos + len(s.text) + len(STEP_SEP)
            if not s.trainable:
                masked.append((pos, end))
            pos = end
        body = enc["input_ids"] + [self.tok.eos_token_id]
        labels = [-100 if any(a <= start < b for a, b in masked) else t
                  for t, (start, _) in zip(enc["input_ids"], enc["offset_mapping"])]
        prompt = self.prompt(problem)
        return prompt + body, [-100] * len(prompt) + labels + [self.tok.eos_token_id]

    def solution(self, problem: ArithProblem, rng: random.Random) -> tuple[list[int], list[int]]:
        if self.handoff and rng.random() < self.handoff:
            return self.steps(problem, handoff_chain(problem, rng, SMALL, self.style))
        return self.steps(problem, chain(problem, rng, self.style))

    def judge_row(self, c: Candidate) -> tuple[list[int], list[int]]:
        ids = self.prompt(c.problem) + self.enc(STEP_SEP.join((*c.context, c.step)) + STEP_SEP) + self.judge_suffix
        digit = self.digits[9 if c.ok else 0]
        return ids + [digit], [-100] * len(ids) + [digit]


def dense_candidates(problem: ArithProblem, steps: list[str]) -> list[Candidate]:
    """Every step of a written solution up to its first error, labelled by exact arithmetic."""
    return [Candidate(problem, tuple(steps[:k]), steps[k], ok) for k, ok in enumerate(label_steps(problem, steps))]


def synthetic_candidates(problem: ArithProblem, rng: random.Random) -> list[Candidate]:
    """Stand-in before a small model exists: a SMALL-style chain's steps, its injected errors as the wrong ones."""
    steps = chain(problem, rng, SMALL)
    return [Candidate(problem, tuple(s.text for s in steps[:k]), st.text, st.correct) for k, st in enumerate(steps)]


def judge_pool(small_dir: Path | None, tok: PreTrainedTokenizerFast, problems: list[ArithProblem],
               rng: random.Random, max_new_tokens: int = MAX_NEW_TOKENS) -> list[Candidate]:
    if small_dir is None:
        return [c for p in problems for c in synthetic_candidates(p, rng)]
    small = AutoModelForCausalLM.from_pretrained(small_dir)
    enc = ExampleEncoder(tok)
    texts = greedy_texts(small, tok, [enc.prompt(p) for p in problems], max_new_tokens)
    return [c for p, t in zip(problems, texts) for c in dense_candidates(p, t.split(STEP_SEP))]


def twin(c: Candidate, rng: random.Random, tries: int = 8) -> Candidate | None:
    """The same step with one number changed so that exact arithmetic calls it wrong (None if no change does)."""
    spans = [m.span() for m in NUMBER.finditer(c.step) if not any(a <= m.start() < b for a, b in
                                                                   (n.span() for n in NOT_NUMBER.finditer(c.step)))]
    for _ in range(tries if spans else 0):
        a, b = rng.choice(spans)
        value = max(0, int(c.step[a:b]) + rng.choice([1, -1, 10, -10, 2, -2, 3]))
        text = c.step[:a] + str(value) + c.step[b:]
        labels = label_steps(c.problem, [*c.context, text])
        if len(labels) == len(c.context) + 1 and not labels[-1]:
            return Candidate(c.problem, c.context, text, False)
    return None


def judge_share(spec: ModelSpec, step: int, total: int, curriculum: bool = True) -> float:
    if not curriculum:
        return spec.judge_share
    return spec.judge_share * min(1.0, max(0.0, (step / total - JUDGE_START) / (JUDGE_FULL - JUDGE_START)))


def weighted_loss(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token loss where the judge rows' score tokens carry ``batch['judge_weight']`` of the total."""
    judge_rows, w = batch["judge_rows"], float(batch["judge_weight"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="none")
    ce = ce.view_as(labels)
    valid = labels != -100
    parts = [(1 - w, ce[valid & ~judge_rows[:, None]]), (w, ce[valid & judge_rows[:, None]])]
    parts = [(weight, x) for weight, x in parts if weight > 0 and x.numel()]
    return sum(weight * x.mean() for weight, x in parts) / sum(weight for weight, _ in parts)


Item = list[tuple[list[int], list[int]]]  # one solution row, or a judge row with its twin


class Batches:
    """Seeded training batches: solutions in the model's style, judge rows and their twins per the curriculum.

    Chains vary 2-3x in length, so batches are drawn ``group`` at a time, sorted by length and served in a
    shuffled order: a batch pads little (training cost is the padded width). A group is a pure function of
    the seed and its index, so a run resumed at any step draws exactly the batches an uninterrupted one would.
    """

    def __init__(self, enc: ChainEncoder, spec: ModelSpec, seed: str, size: int, total: int, pool: list[Candidate],
                 device: torch.device, group: int = 8, curriculum: bool = True):
        self.enc, self.spec, self.seed, self.size, self.total, self.pool = enc, spec, seed, size, total, pool
        self.device, self.group, self.curriculum = device, group, curriculum
        self._cached: tuple[int, list[tuple[Item, list[bool]]]] | None = None

    def item(self, rng: random.Random, share: float) -> tuple[Item, list[bool]]:
        if rng.random() < share:
            c = rng.choice(self.pool)
            pair = [c] + ([t] if c.ok and (t := twin(c, rng)) else [])
            return [self.enc.judge_row(x) for x in pair], [True] * len(pair)
        return [self.enc.solution(train_problem(rng), rng)], [False]

    def draw_group(self, g: int) -> list[tuple[Item, list[bool]]]:
        """``group`` batches of about ``size`` rows: solutions sorted by length, judge pairs dealt out evenly."""
        rng = random.Random(f"{self.seed}/{g}")
        share = self.share(g)
        items: list[tuple[Item, list[bool]]] = []
        while sum(len(rows) for rows, _ in items) < self.size * self.group:
            items.append(self.item(rng, share))
        batches: list[tuple[Item, list[bool]]] = [([], []) for _ in range(self.group)]
        judges = [it for it in items if it[1][0]]
        solutions = sorted((it for it in items if not it[1][0]), key=lambda it: len(it[0][0][0]))
        n_rows, seen = sum(len(rows) for rows, _ in solutions), 0
        for i, (rows, judged) in enumerate(judges):
            batches[i % self.group][0].extend(rows)
            batches[i % self.group][1].extend(judged)
        for rows, judged in solutions:
            k = seen * self.group // n_rows
            batches[k][0].extend(rows)
            batches[k][1].extend(judged)
            seen += len(rows)
        rng.shuffle(batches)
        return batches

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        g = step // self.group
        if self._cached is None or self._cached[0] != g:
            self._cached = (g, self.draw_group(g))
        rows, judged = self._cached[1][step % self.group]
        b = collate(rows, self.enc.tok.pad_token_id)
        b["judge_rows"] = torch.tensor(judged)
        b = {k: v.to(self.device) for k, v in b.items()}
        b["judge_weight"] = torch.tensor(self.share(g))
        return b

    def share(self, g: int) -> float:
        return judge_share(self.spec, g * self.group, self.total, self.curriculum) if self.pool else 0.0


@torch.no_grad()
def judge_scores(model: LlamaForCausalLM, enc: ChainEncoder, cands: list[Candidate], bs: int = 32) -> list[float]:
    """Expected 0-9 score of each candidate from one forward pass (the prompt judge's single-token read)."""
    was_training = model.training
    model.eval()
    scores = []
    for i in range(0, len(cands), bs):
        rows = [enc.judge_row(c)[0][:-1] for c in cands[i : i + bs]]
        b = collate([(r, r) for r in rows], enc.tok.pad_token_id)
        logits = model(input_ids=b["input_ids"].to(model.device), attention_mask=b["attention_mask"].to(model.device)).logits
        last = logits[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])][:, enc.digits].float()
        scores += (last.softmax(-1) @ torch.arange(10.0, device=last.device)).tolist()
    model.train(was_training)
    return scores


def cue_rate(tok: PreTrainedTokenizerFast, steps: list[str], n1: int = 20) -> float:
    """Share of steps whose first ``n1`` tokens Speculative Thinking classifies as reflection or affirmation."""
    probes = [tok.decode(tok.encode(s, add_special_tokens=False)[:n1]) for s in steps]
    return sum(classify(p, CUES) != "statement" for p in probes) / max(1, len(probes))


def handoff_prefixes(problems: list[ArithProblem], small_texts: list[str]) -> list[str]:
    """Where a large model takes over the small model's own solution: before its first wrong step (the step a
    judge rejects, a consultant corrects), or halfway through a solution without one."""
    prefixes = []
    for p, text in zip(problems, small_texts):
        steps = text.split(STEP_SEP)
        labels = label_steps(p, steps)
        k = labels.index(False) if False in labels else len(steps) // 2
        prefixes.append(STEP_SEP.join(steps[:k]) + STEP_SEP if k else "")
    return prefixes


def handoff_accuracy(model: LlamaForCausalLM, enc: ChainEncoder, problems: list[ArithProblem], prefixes: list[str],
                     max_new_tokens: int = MAX_NEW_TOKENS) -> float:
    """Greedy accuracy of ``model`` finishing solutions the small model began (`handoff_prefixes`)."""
    texts = greedy_texts(model, enc.tok, [enc.prompt(p) + enc.enc(pre) for p, pre in zip(problems, prefixes)],
                         max_new_tokens)
    return sum(bool(m := BOXED.findall(t)) and int(m[-1]) == p.answer for p, t in zip(problems, texts)) / len(problems)


def evaluate(model: LlamaForCausalLM, enc: ChainEncoder, problems: list[ArithProblem], judged: list[Candidate],
             max_new_tokens: int = MAX_NEW_TOKENS, prefixes: list[str] | None = None) -> dict:
    """Greedy accuracy, chain length (tokens, steps), cue rates; judge AUROC when the model judges; accuracy
    finishing the small model's solutions when ``prefixes`` are given (`handoff_prefixes`).

    ``cue_after_wrong`` / ``cue_after_correct``: how often the step after a wrong / a correct step (exact
    labels, up to a solution's first error) opens with a Speculative Thinking cue, the issue's target for the
    small model (more often after its wrong steps).
    """
    texts = greedy_texts(model, enc.tok, [enc.prompt(p) for p in problems], max_new_tokens)
    correct = n_tokens = 0
    steps: list[str] = []
    after: dict[bool, list[str]] = {True: [], False: []}
    for p, t in zip(problems, texts):
        m = BOXED.findall(t)
        correct += bool(m) and int(m[-1]) == p.answer
        written = t.split(STEP_SEP)
        steps += written
        n_tokens += len(enc.enc(t))
        for k, ok in enumerate(label_steps(p, written)[: len(written) - 1]):
            after[ok].append(written[k + 1])
    out = {"accuracy": correct / len(problems), "mean_tokens": n_tokens / len(problems), "mean_steps": len(steps) / len(problems),
           "cue_rate": cue_rate(enc.tok, steps), "cue_after_wrong": cue_rate(enc.tok, after[False]),
           "cue_after_correct": cue_rate(enc.tok, after[True]), "wrong_steps": len(after[False]),
           "correct_steps": len(after[True])}
    if judged:
        out["judge_auroc"] = auroc(judge_scores(model, enc, judged), [c.ok for c in judged])
    if prefixes:
        out["handoff_accuracy"] = handoff_accuracy(model, enc, problems, prefixes, max_new_tokens)
    return out


def write_card(path: Path, name: str, spec: ModelSpec, n_params: int, info: dict) -> None:
    role = {"small": "A small, fast and error-prone reasoning model that hesitates where it errs",
            "mid": "A mid-sized reasoning model", "large": "A large, slow and mostly right reasoning model and step judge"}[name]
    judge = ("no judging data" if spec.judge_share == 0 else
             f"judge rows ramp to {spec.judge_share:.0%} of rows and of the loss after {JUDGE_START:.0%} of training, "
             f"candidates: {info['judge_pool']}, each correct one with a contrastive wrong twin")
    test = info["test"]
    judged = (f"; prompt-judge AUROC {test['judge_auroc']:.3f} on test-split steps written by the small model"
              if "judge_auroc" in test else "")
    first = info.get("first_stage", info)
    budget = (f"{first['steps']} steps of batch {first['batch_size']} in {first['train_minutes']:.1f} minutes on "
              f"{first['device']}, AdamW lr {spec.lr} with warmup and cosine decay; stopped: {first['stop_reason']}")
    for k, h in enumerate(info.get("handoffs", []), 1):
        budget += (f"; then handoff stage {k} (`--handoff`): {h['steps']} steps at lr {h['lr']} (warmup, cosine), "
                   f"{h['share']:.0%} of solution rows begun by a SMALL-style prefix (not trained on), judge rows at "
                   f"their full share, {h['minutes']:.1f} minutes on {h['device']}; stopped: {h['stop_reason']}; "
                   f"held-out accuracy after it {h['test']['accuracy']:.3f}")
    if "handoff_accuracy" in test:
        judged += (f"; finishing the small model's own solutions from before its first wrong step (halfway when "
                   f"it has none): accuracy {test['handoff_accuracy']:.3f}")
    card = f"""# arith2-{name}

{role}, of the reasonspec `arith` world (second generation), trained from scratch by
`python -m evals.arith2.train` (seeded; the module docstring explains the data and the judge route).

- architecture: Llama (LlamaForCausalLM), {spec.layers} layers, hidden {spec.hidden}, MLP {spec.ffn}, {spec.heads} heads,
  tied embeddings, vocabulary {info['vocab']} (byte-level BPE, Qwen2 pre-tokenizer, single digits), {n_params:,} parameters, fp32
- data: an endless seeded stream of train-split problems (mix {TRAIN_MIX}), R1-shaped chains in the
  `{STYLES[name].name}` style (`evals/arith2/chains.py`), tokenized whole; injected wrong steps are not trained on;
  {judge}
- budget: {budget}
- held-out (test split, {info['test_n']} problems, medium, greedy): accuracy {test['accuracy']:.3f}, mean
  {test['mean_tokens']:.0f} tokens and {test['mean_steps']:.1f} steps; Speculative Thinking cue rate {test['cue_rate']:.3f}
  of steps, {test['cue_after_wrong']:.3f} after a wrong step and {test['cue_after_correct']:.3f} after a correct one{judged};
  final training loss {info['loss']:.4f}
"""
    (path / "README.md").write_text(card)


def small_prefixes(out: Path, tok: PreTrainedTokenizerFast, problems: list[ArithProblem], max_new_tokens: int) -> list[str]:
    """`handoff_prefixes` of the trained small model's greedy solutions (none before a small model exists)."""
    if not (out / "small" / "config.json").exists():
        return []
    small = AutoModelForCausalLM.from_pretrained(out / "small")
    return handoff_prefixes(problems, greedy_texts(small, tok, [ExampleEncoder(tok).prompt(p) for p in problems], max_new_tokens))


def stage_records(folder: Path) -> tuple[dict, list[dict], list[list[dict]]]:
    """From the folder's ``training.json``: the from-scratch stage's record (with its history), then the handoff
    stages trained since, and their histories."""
    rec = json.loads((folder / "training.json").read_text())
    if "first_stage" not in rec:
        return rec, [], []
    return {**rec["first_stage"], "history": rec["history"]["first_stage"]}, rec["handoffs"], rec["history"]["handoffs"]


def train(name: str, out: Path, minutes: float, batch_size: int, seed: int, eval_every: int, ckpt_every: int,
          max_steps: int | None, device: torch.device, val_n: int = 100, test_n: int = 200, pool_n: int = 600,
          max_new_tokens: int = MAX_NEW_TOKENS, handoff: bool = False) -> dict:
    """Train ``name`` from scratch, or with ``handoff`` continue the trained ``OUT/name`` with its next `Handoff`."""
    spec = SPECS[name]
    previous, done, done_history = stage_records(out / name) if handoff else (None, [], [])
    if handoff and len(done) >= len(HANDOFF[name]):
        raise ValueError(f"{out / name} has trained all {len(done)} handoff stages of {name!r} already")
    stage = HANDOFF[name][len(done)] if handoff else None
    if stage:
        spec = replace(spec, max_steps=stage.steps, lr=stage.lr)
    total = max_steps or spec.max_steps
    tag = (f"{name}-handoff" + (str(len(done) + 1) if done else "")) if stage else name
    tok = load_or_build_tokenizer(out)
    enc = ChainEncoder(tok, STYLES[name], stage.share if stage else 0.0)
    torch.manual_seed(seed)
    model = (AutoModelForCausalLM.from_pretrained(out / name) if stage else build_model(spec, tok)).to(device)
    pool: list[Candidate] = []
    judged: dict[str, list[Candidate]] = {"val": [], "test": []}  # held-out steps to judge, from the first problems
    pool_kind = "none"
    if spec.judge_share > 0:
        small_dir = out / "small" if (out / "small" / "config.json").exists() else None
        pool_kind = ("the trained small model's own steps (on-policy)" if small_dir
                     else "synthetic SMALL-style chains (no small model was trained yet)")
        prng = random.Random(f"arith2/judge-pool/{seed}")
        pool = judge_pool(small_dir, tok, ArithGenerator("train", "medium", seed=seed).take(pool_n), prng, max_new_tokens)
        judged = {split: judge_pool(small_dir, tok, ArithGenerator(split, "medium", seed=0).take(max(1, n // 2)), prng,
                                    max_new_tokens)[:400] for split, n in (("val", val_n), ("test", test_n))}
    val = ArithGenerator("val", "medium", seed=0).take(val_n)
    test_problems = ArithGenerator("test", "medium", seed=0).take(test_n)
    val_prefixes = small_prefixes(out, tok, val, max_new_tokens) if stage else None
    batches = Batches(enc, spec, f"arith2/train/{tag}/{seed}", batch_size, total, pool, device, curriculum=not stage)
    res = fit(model, spec, total, minutes, batches,
              lambda m: evaluate(m, enc, val, judged["val"], max_new_tokens, val_prefixes), None,
              out / ".ckpt" / f"arith2-{tag}.pt", out / f"train-{tag}.jsonl",
              eval_every, ckpt_every, f"train {tag}", loss_fn=weighted_loss)
    print(f"{tag}: stopped after {res.steps} steps ({res.stop_reason})")
    test = evaluate(model, enc, test_problems, judged["test"], max_new_tokens,
                    small_prefixes(out, tok, test_problems, max_new_tokens))
    dest = out / name
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    info = {"steps": res.steps, "batch_size": batch_size, "train_minutes": (time.time() - res.t0) / 60,
            "loss": res.loss or float("nan"),
            "device": f"CPU ({torch.get_num_threads()} threads)" if device.type == "cpu"
            else torch.cuda.get_device_name(device), "test_n": test_n, "test": test, "vocab": len(tok),
            "stop_reason": res.stop_reason, "judge_pool": pool_kind}
    history: list[dict] | dict = res.history
    if stage and previous:
        first = {k: previous[k] for k in ("steps", "batch_size", "train_minutes", "device", "test", "stop_reason", "spec")}
        this = {**stage.__dict__, "steps": res.steps, "minutes": info["train_minutes"], "device": info["device"],
                "stop_reason": res.stop_reason, "test": test}
        info = {**info, "steps": previous["steps"], "train_minutes": previous["train_minutes"], "first_stage": first,
                "handoffs": [*done, this]}
        history = {"first_stage": previous["history"], "handoffs": [*done_history, res.history]}
    write_card(dest, name, SPECS[name], sum(p.numel() for p in model.parameters()), info)
    (dest / "training.json").write_text(json.dumps({"spec": SPECS[name].__dict__, **info, "history": history}, indent=1))
    print(json.dumps({tag: info}))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["small", "mid", "large"], choices=list(SPECS),
                    help="in this order by default: the large model's judge data comes from the trained small model")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--minutes", type=float, default=90.0, help="wall-clock budget per model")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--val-problems", type=int, default=100)
    ap.add_argument("--test-problems", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="per greedy evaluation solution")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads: 2 train ~1.5x faster on idle cores, 5x slower when other processes use them")
    ap.add_argument("--handoff", action="store_true",
                    help=f"continue the trained models ({', '.join(HANDOFF)}) with their next handoff stage (see Handoff)")
    ap.add_argument("--cards", action="store_true", help="only rewrite the model cards from each training.json")
    args = ap.parse_args()
    if args.cards:
        for name in args.models:
            rec = json.loads((args.out / name / "training.json").read_text())
            model = AutoModelForCausalLM.from_pretrained(args.out / name)
            write_card(args.out / name, name, SPECS[name], sum(p.numel() for p in model.parameters()), rec)
        return
    if args.handoff:
        for name in args.models:
            if name not in HANDOFF:
                ap.error(f"--handoff: no handoff stage for {name!r} (stages: {', '.join(HANDOFF)})")
            if not (args.out / name / "training.json").exists():
                ap.error(f"--handoff continues a trained model, but {args.out / name} has no training.json: "
                         f"train it first (without --handoff)")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        train(name, args.out, args.minutes, args.batch_size, args.seed, args.eval_every, args.ckpt_every, args.max_steps,
              torch.device(args.device), args.val_problems, args.test_problems, max_new_tokens=args.max_new_tokens,
              handoff=args.handoff)


if __name__ == "__main__":
    main()
