"""Train the arith pair from scratch: ``python -m evals.arith.train``.

Both models share one tokenizer (so token-level policies can pair them) and are
Llama-architecture causal LMs saved in the standard Hugging Face layout, loadable
by ``AutoModelForCausalLM`` and by vLLM. The large model is deeper (a CPU forward
pass costs per layer at this scale) and also learns the step-judging format.

Loss is on the solution tokens only. Training is seeded and resumable: a
checkpoint with model, optimizer, step and RNG state is written every
``--ckpt-every`` steps and picked up automatically by the next run.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evals.arith.problems import ArithGenerator, ArithProblem, random_problem, split_of
from evals.arith.solutions import STEP_SEP, candidate_for_judge, solution_steps
from evals.arith.tokenizer import build_tokenizer
from orchestrator.prompting import user_message
from policies.judge_prompt import DEFAULT_INSTRUCTION, DEFAULT_PREFILL, judge_suffix_text

DEFAULT_OUT = Path(__file__).parent / "models"
BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


@dataclass(frozen=True)
class ModelSpec:
    layers: int
    hidden: int
    ffn: int
    heads: int
    judge_share: float  # fraction of training examples that teach the judging format
    max_steps: int
    lr: float
    stop_at_val_acc: float  # early stop on the validation split: how strong the model is meant to be


SPECS = {
    "small": ModelSpec(layers=2, hidden=128, ffn=384, heads=4, judge_share=0.0, max_steps=2500, lr=2e-3, stop_at_val_acc=0.5),
    "large": ModelSpec(layers=10, hidden=192, ffn=512, heads=6, judge_share=0.25, max_steps=3000, lr=1.5e-3, stop_at_val_acc=0.97),
}
TRAIN_MIX = {"easy": 0.25, "medium": 0.75}
P_ERROR, P_VERIFY = 0.15, 0.08


def tokenizer_corpus(seed: int = 1234, n: int = 4000) -> list[str]:
    rng = random.Random(seed)
    corpus = []
    for _ in range(n):
        p = random_problem(rng, rng.choice(list(TRAIN_MIX)))
        corpus.append(user_message(p.text))
        corpus.append(STEP_SEP.join(s.text for s in solution_steps(p, rng, P_ERROR, P_VERIFY)))
    corpus += [DEFAULT_INSTRUCTION, DEFAULT_PREFILL] * (n // 10)  # the judging format, so it tokenizes compactly
    return corpus


def load_or_build_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    path = out / "tokenizer"
    if path.exists():
        return PreTrainedTokenizerFast.from_pretrained(path)
    tok = build_tokenizer(tokenizer_corpus())
    tok.save_pretrained(path)
    return tok


class ExampleEncoder:
    """Turns problems into (input_ids, labels) with loss only where the model must write."""

    def __init__(self, tok: PreTrainedTokenizerFast):
        self.tok = tok
        self.sep = tok.encode(STEP_SEP, add_special_tokens=False)
        self.judge_suffix = tok.encode(judge_suffix_text(tok), add_special_tokens=False)
        self.digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]

    def prompt(self, problem: ArithProblem) -> list[int]:
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": user_message(problem.text)}], add_generation_prompt=True, tokenize=False
        )
        return self.tok.encode(text, add_special_tokens=False)

    def enc(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def solution(self, problem: ArithProblem, rng: random.Random) -> tuple[list[int], list[int]]:
        ids = self.prompt(problem)
        labels = [-100] * len(ids)
        steps = solution_steps(problem, rng, P_ERROR, P_VERIFY)
        for i, step in enumerate(steps):
            seg = self.enc(step.text) + (self.sep if i < len(steps) - 1 else [self.tok.eos_token_id])
            ids += seg
            labels += seg if step.trainable else [-100] * len(seg)
        return ids, labels

    def judge(self, problem: ArithProblem, rng: random.Random) -> tuple[list[int], list[int]]:
        context, candidate, ok = candidate_for_judge(problem, rng)
        score = (9 if rng.random() < 0.75 else 8) if ok else rng.randint(0, 3)
        ids = self.prompt(problem)
        for step in context + [candidate]:
            ids += self.enc(step) + self.sep
        ids += self.judge_suffix
        labels = [-100] * len(ids) + [self.digits[score]]
        return ids + [self.digits[score]], labels


def train_problem(rng: random.Random) -> ArithProblem:
    while True:
        diff = "easy" if rng.random() < TRAIN_MIX["easy"] else "medium"
        p = random_problem(rng, diff)
        if split_of(p.text) == "train":
            return p


def collate(rows: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded (input_ids, labels) rows as a training batch."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def batch(enc: ExampleEncoder, spec: ModelSpec, rng: random.Random, size: int, pad: int) -> dict[str, torch.Tensor]:
    rows = [
        enc.judge(train_problem(rng), rng) if rng.random() < spec.judge_share else enc.solution(train_problem(rng), rng)
        for _ in range(size)
    ]
    return collate(rows, pad)


def build_model(spec: ModelSpec, tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden,
        intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def greedy_texts(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, prompts: list[list[int]], max_new_tokens: int,
                 bs: int = 50) -> list[str]:
    """Greedy continuations of left-padded prompt batches, decoded without special tokens."""
    was_training = model.training
    model.eval()
    texts = []
    for i in range(0, len(prompts), bs):
        chunk = prompts[i : i + bs]
        width = max(map(len, chunk))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in chunk])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in chunk])[:, None]).long()
        out = model.generate(
            input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        texts += [tok.decode(row, skip_special_tokens=True) for row in out[:, width:]]
    model.train(was_training)
    return texts


def greedy_accuracy(model: LlamaForCausalLM, enc: ExampleEncoder, problems: list[ArithProblem], bs: int = 50) -> dict:
    """Greedy final-answer accuracy and how often the model reflects ("Wait")."""
    texts = greedy_texts(model, enc.tok, [enc.prompt(p) for p in problems], 200, bs)
    correct = reflect = 0
    for p, text in zip(problems, texts):
        m = BOXED.findall(text)
        correct += bool(m) and int(m[-1]) == p.answer
        reflect += "Wait" in text
    return {"accuracy": correct / len(problems), "reflection_rate": reflect / len(problems)}


def write_card(path: Path, name: str, spec: ModelSpec, n_params: int, log: dict) -> None:
    card = f"""# arith-{name}

A {'small, fast and error-prone' if name == 'small' else 'large, slow and mostly right'} reasoning model of the
reasonspec `arith` world, trained from scratch by `python -m evals.arith.train` (seeded; see that module).

- architecture: Llama (LlamaForCausalLM), {spec.layers} layers, hidden {spec.hidden}, MLP {spec.ffn}, {spec.heads} heads,
  tied embeddings, vocabulary {log['vocab']} (byte-level BPE, single-digit tokens), {n_params:,} parameters, fp32
- data: an endless seeded stream of train-split arith problems (difficulty mix {TRAIN_MIX}), step-by-step solutions
  separated by blank lines ending in `\\boxed{{}}`; {P_ERROR:.0%} of steps replaced by a wrong step (not trained on)
  followed by a "Wait, ..." correction; {P_VERIFY:.0%} verification steps;
  {'no judging data' if spec.judge_share == 0 else f'{spec.judge_share:.0%} of examples teach the 0-9 step-judging format'}
- budget: {log['steps']} steps of batch {log['batch_size']} in {log['train_minutes']:.1f} minutes on {log['device']}, AdamW lr {spec.lr}
  with warmup and cosine decay
- held-out (test split, {log['test_n']} problems, medium difficulty, greedy): accuracy {log['test_accuracy']:.3f},
  reflection rate {log['test_reflection_rate']:.3f}; final training loss {log['loss']:.4f}
"""
    (path / "README.md").write_text(card)


@dataclass
class FitResult:
    steps: int
    loss: float | None  # moving average of the training loss
    history: list[dict]  # one record per evaluation
    stop_reason: str
    t0: float  # wall-clock start, moved back by the time earlier (resumed) runs took


def fit(model: LlamaForCausalLM, spec: ModelSpec, total: int, minutes: float, make_batch: Callable[[int], dict[str, torch.Tensor]],
        evaluate: Callable[[LlamaForCausalLM], dict], rng: random.Random | None, ckpt: Path, log_path: Path, eval_every: int,
        ckpt_every: int, desc: str,
        loss_fn: Callable[[LlamaForCausalLM, dict[str, torch.Tensor]], torch.Tensor] = lambda m, b: m(**b).loss) -> FitResult:
    """The training loop both arith generations share: AdamW with warmup and cosine decay, a tqdm bar, an
    evaluation every ``eval_every`` steps appended to ``log_path`` (early stop at ``spec.stop_at_val_acc``),
    and a checkpoint (model, optimizer, schedule, data and torch RNG, history) that the next run resumes from.

    ``make_batch(step)`` draws the next batch from ``rng``, whose state is checkpointed with the rest (None: the
    batches are a function of the step alone);
    ``loss_fn(model, batch)`` is the model's own next-token loss unless a caller weighs parts of the batch.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    )
    step, elapsed, history = 0, 0.0, []
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"]); opt.load_state_dict(state["opt"]); sched.load_state_dict(state["sched"])
        if rng is not None:
            rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        print(f"resumed {desc} at step {step}")
    bar = tqdm(total=total, initial=step, desc=desc)
    model.train()
    t0 = time.time() - elapsed
    loss_ema = None

    def save_ckpt() -> None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": rng and rng.getstate(),
                    "torch_rng": torch.get_rng_state(), "step": step, "elapsed": time.time() - t0, "history": history}, ckpt)

    stop_reason = "max steps"
    while step < total:
        if (time.time() - t0) / 60 > minutes:
            stop_reason = "time budget"
            break
        b = make_batch(step)
        loss = loss_fn(model, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.4f}")
        if step % eval_every == 0 or step == total:
            metrics = evaluate(model)
            rec = {"step": step, "loss": loss_ema, "minutes": (time.time() - t0) / 60, **{f"val_{k}": v for k, v in metrics.items()}}
            history.append(rec)
            with log_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.write(json.dumps(rec))
            if metrics["accuracy"] >= spec.stop_at_val_acc:
                stop_reason = f"validation accuracy reached {spec.stop_at_val_acc}"
                break
        if step % ckpt_every == 0:
            save_ckpt()
    bar.close()
    save_ckpt()
    return FitResult(step, loss_ema, history, stop_reason, t0)


def train(name: str, out: Path, minutes: float, batch_size: int, seed: int, eval_every: int, ckpt_every: int,
          max_steps: int | None) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = SPECS[name]
    total = max_steps or spec.max_steps
    tok = load_or_build_tokenizer(out)
    enc = ExampleEncoder(tok)
    torch.manual_seed(seed)
    model = build_model(spec, tok)
    rng = random.Random(f"train/{name}/{seed}")
    val = ArithGenerator("val", "medium", seed=0).take(100)
    res = fit(model, spec, total, minutes, lambda _: batch(enc, spec, rng, batch_size, tok.pad_token_id),
              lambda m: greedy_accuracy(m, enc, val), rng, out / ".ckpt" / f"{name}.pt", out / f"train-{name}.jsonl",
              eval_every, ckpt_every, f"train {name}")
    step, loss_ema, history, stop_reason, t0 = res.steps, res.loss, res.history, res.stop_reason, res.t0
    print(f"{name}: stopped after {step} steps ({stop_reason})")
    test = ArithGenerator("test", "medium", seed=0).take(200)
    metrics = greedy_accuracy(model, enc, test)
    dest = out / name
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    info = {"steps": step, "batch_size": batch_size, "train_minutes": (time.time() - t0) / 60, "loss": loss_ema or float("nan"),
            "device": "CPU (2 cores)", "test_n": len(test), "test_accuracy": metrics["accuracy"],
            "test_reflection_rate": metrics["reflection_rate"], "vocab": len(tok), "stop_reason": stop_reason}
    write_card(dest, name, spec, sum(p.numel() for p in model.parameters()), info)
    (dest / "training.json").write_text(json.dumps({"spec": spec.__dict__, **info, "history": history}, indent=1))
    print(json.dumps({name: info}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["small", "large"], choices=sorted(SPECS))
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--minutes", type=float, default=45.0, help="wall-clock budget per model")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--ckpt-every", type=int, default=100)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        train(name, args.out, args.minutes, args.batch_size, args.seed, args.eval_every, args.ckpt_every, args.max_steps)


if __name__ == "__main__":
    main()
