"""Train a Kangaroo adapter for a target model: ``python -m evals.kangaroo_adapter --out DIR``.

The self-draft is the target's first ``--exit-layer`` layers, one adapter layer and the target's
LM head (``workers.hf_drafts``); only the adapter learns. The objective is Kangaroo's soft-label
cross-entropy against the full target's next-token distribution at every position the target
writes, -sum p_target * log softmax(head(adapter(h_exit))), computed as the forward KL it equals up
to the target's entropy (same gradient), with the divergence ``reasonspec distill`` uses.

Data: worked solutions of an arith world by default (``--world arith2``, the default, writes the
second generation's CAREFUL chains, which its large model writes; ``--world arith`` the first pair's), or
``--texts FILE.jsonl`` (one ``{"text": ...}`` per line, loss on every position) for other models.
The target labels every position itself, so the data only has to look like what it will write.

The loop is ``evals.arith.train.fit`` (AdamW with warmup and cosine decay, a progress bar, a
seeded data stream, a checkpoint in ``DIR/.ckpt`` that the next run resumes from). It differs
from Kangaroo's recipe for a 7B target (lr 3e-5, betas 0.9/0.95, clip 0.5, 20 epochs of ShareGPT)
in the learning rate and length, sized for a small model trained in minutes on a CPU.
The output folder holds ``adapter.safetensors``, ``adapter_config.json`` and a card; serve it with
``speculative: {method: kangaroo, model: DIR}``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from evals.arith.problems import ArithGenerator
from evals.arith.train import ExampleEncoder, ModelSpec, collate, fit, train_problem
from orchestrator.distill import divergence
from workers.hf_drafts import KANGAROO_EXIT_LAYER, KangarooAdapter, save_adapter, self_draft

WORLDS = ("arith", "arith2")


def world_models(world: str) -> Path:
    """The folder of ``world``'s committed models (``small``, ``large``, ...)."""
    if world not in WORLDS:
        raise ValueError(f"unknown arith world {world!r}: one of {', '.join(WORLDS)}")
    return Path(__file__).parent / world / "models"


def world_encoder(world: str, tok: object) -> ExampleEncoder:
    """The encoder of the text ``world``'s large model writes: the first pair's worked solutions, or the
    second generation's CAREFUL chains (tokenized whole, as the model sees its own text)."""
    if world == "arith":
        return ExampleEncoder(tok)
    if world == "arith2":
        from evals.arith2.train import STYLES, ChainEncoder

        return ChainEncoder(tok, STYLES["large"])
    raise ValueError(f"unknown arith world {world!r}: one of {', '.join(WORLDS)}")
Batch = dict[str, torch.Tensor]


def arith_rows(enc: ExampleEncoder, rng: random.Random, n: int) -> list[tuple[list[int], list[int]]]:
    """Worked solutions of train-split problems; labels mark the tokens the model writes."""
    return [enc.solution(train_problem(rng), rng) for _ in range(n)]


def text_rows(tok: object, texts: list[str], rng: random.Random, n: int) -> list[tuple[list[int], list[int]]]:
    rows = []
    for text in rng.choices(texts, k=n):
        ids = tok.encode(text, add_special_tokens=False)[:1024]
        rows.append((ids, list(ids)))
    return rows


def kangaroo_loss(target: torch.nn.Module, draft: torch.nn.Module, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward KL(target || draft) over the positions that predict a written token, and the draft's greedy
    agreement with the target there (the per-token acceptance of greedy verification)."""
    target.eval()  # the layers the draft shares stay frozen in eval mode while the adapter trains
    with torch.no_grad():
        teacher = target(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
    student = draft(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
    where = b["labels"][:, 1:] != -100  # position t predicts token t + 1
    t, s = torch.log_softmax(teacher[:, :-1][where], -1), torch.log_softmax(student[:, :-1][where], -1)
    loss = divergence("fkl", t, s).mean()
    agree = (t.argmax(-1) == s.argmax(-1)).float().mean()
    return loss, agree


def train_adapter(target_path: str, out: Path, *, exit_layer: int = KANGAROO_EXIT_LAYER, steps: int = 300,
                  batch_size: int = 16, lr: float = 1e-3, seed: int = 0, minutes: float = 30.0, eval_every: int = 50,
                  ckpt_every: int = 50, texts: list[str] | None = None, world: str = "arith2",
                  quiet: bool = False) -> dict:
    """Train (or resume) an adapter for ``target_path`` and write its folder; returns the card's numbers.

    ``world`` names the arith world whose solutions are the data (ignored with ``texts``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(target_path)
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()
    target.requires_grad_(False)
    adapter = KangarooAdapter(target, exit_layer).requires_grad_(True)  # copied from frozen layers
    draft = self_draft(target, adapter)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    enc = world_encoder(world, tok) if texts is None else None
    rng = random.Random(f"kangaroo/{target_path}/{seed}")

    def rows(r: random.Random, n: int) -> list[tuple[list[int], list[int]]]:
        return arith_rows(enc, r, n) if enc is not None else text_rows(tok, texts, r, n)

    if enc is not None:  # held out: the validation split, fixed
        val_rng = random.Random("kangaroo/val")
        held = collate([enc.solution(p, val_rng) for p in ArithGenerator("val", "medium", seed=0).take(32)], pad)
    else:
        held = collate(rows(random.Random("kangaroo/val"), 32), pad)

    def evaluate(_: torch.nn.Module) -> dict:
        draft.eval()
        with torch.no_grad():
            loss, agree = kangaroo_loss(target, draft, held)
        draft.train()
        return {"accuracy": float(agree), "forward_kl": float(loss)}

    loss_fn: Callable[[torch.nn.Module, Batch], torch.Tensor] = lambda m, b: kangaroo_loss(target, m, b)[0]
    spec = ModelSpec(layers=exit_layer + 1, hidden=target.config.hidden_size, ffn=0,
                     heads=target.config.num_attention_heads, judge_share=0.0, max_steps=steps, lr=lr,
                     stop_at_val_acc=1.01)  # never stops early: agreement is at most 1
    ckpt = out / ".ckpt" / "adapter.pt"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = fit(draft, spec, steps, minutes, lambda _: collate(rows(rng, batch_size), pad), evaluate, rng, ckpt,
              out / "train-log.jsonl", eval_every, ckpt_every, "kangaroo adapter", loss_fn=loss_fn)
    final = evaluate(draft)
    info = {
        "exit_layer": exit_layer, "target_layers": target.config.num_hidden_layers,
        "adapter_parameters": sum(p.numel() for p in adapter.parameters()),
        "steps": res.steps, "batch_size": batch_size, "lr": lr, "seed": seed, "stop_reason": res.stop_reason,
        "train_minutes": (time.time() - res.t0) / 60, "this_run_minutes": (time.time() - t0) / 60,
        "threads": torch.get_num_threads(), "data": f"{world} worked solutions" if texts is None else "text file",
        "heldout_top1_agreement": final["accuracy"], "heldout_forward_kl": final["forward_kl"],
    }
    name = portable_name(target_path)
    save_adapter(adapter, out, name, tok, {"training": info})
    write_card(out, name, info)
    if not quiet:
        print(json.dumps(info))
    return info


def portable_name(path: str | Path) -> str:
    """A model folder as the adapter records it: relative to the repository when inside it, so a committed
    adapter does not name the machine it was trained on."""
    from orchestrator.config import PACKAGE_ROOT

    p = Path(path).resolve()
    return str(p.relative_to(PACKAGE_ROOT)) if p.is_relative_to(PACKAGE_ROOT) else str(path)


def write_card(out: Path, target: str, info: dict) -> None:
    card = f"""# Kangaroo adapter for `{target}`

A self-draft adapter (Kangaroo, Liu et al. 2024) trained by `python -m evals.kangaroo_adapter` (seeded, resumable).
The draft is the target's first {info['exit_layer']} of {info['target_layers']} layers, this adapter (RMSNorm,
self-attention with residual, no MLP; final RMSNorm; {info['adapter_parameters']:,} parameters) and the target's
own LM head. Use it with `speculative: {{method: kangaroo, model: <this folder>}}` on the hf backend; drafting
stops after a token whose top-1 probability is under `draft_confidence` (default 0.6).

- objective: soft-label cross-entropy against the full target's next-token distribution (as forward KL)
- data: {info['data']}; {info['steps']} steps of batch {info['batch_size']}, AdamW lr {info['lr']}, seed {info['seed']}
  ({info['stop_reason']}), {info['train_minutes']:.1f} minutes with {info['threads']} thread(s)
- held-out greedy top-1 agreement with the target: {info['heldout_top1_agreement']:.3f}
  (forward KL {info['heldout_forward_kl']:.4f})
"""
    (out / "README.md").write_text(card)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", choices=WORLDS, default="arith2", help="the arith world whose solutions are the data")
    ap.add_argument("--model", default=None, help="the target model folder (default: the world's large model)")
    ap.add_argument("--out", type=Path, required=True, help="the adapter folder to write (resumed if it has a checkpoint)")
    ap.add_argument("--exit-layer", type=int, default=KANGAROO_EXIT_LAYER)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget (the checkpoint is kept)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--texts", type=Path, default=None, help="JSONL with a 'text' field per line instead of arith")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = None
    if args.texts is not None:
        texts = [json.loads(line)["text"] for line in args.texts.read_text().splitlines() if line.strip()]
    train_adapter(args.model or str(world_models(args.world) / "large"), args.out, exit_layer=args.exit_layer,
                  steps=args.steps, batch_size=args.batch_size,
                  lr=args.lr, seed=args.seed, minutes=args.minutes, eval_every=args.eval_every,
                  ckpt_every=args.eval_every, texts=texts, world=args.world)


if __name__ == "__main__":
    main()
