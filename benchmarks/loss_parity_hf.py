"""Loss parity: our training step against a plain transformers LlamaForCausalLM + AdamW loop.

Both start from the same weights (ours saved as a model directory, which transformers loads as a
Llama), see the same batches of a prepared dataset in the same order, and use the same AdamW
settings, LR schedule and gradient clipping. Ours runs the trainer's own pieces: the fused
linear + cross-entropy loss (`CausalLMLoss`), `build_optimizer` (no weight decay on norms) and
`lr_at`; theirs is a hand-written loop over the full logits, as a transformers user would write it. The script
prints both curves and the largest per-step difference, and writes them as JSON.

    python benchmarks/loss_parity_hf.py --data runs/data/gutenberg --steps 100 --device cpu
    python benchmarks/loss_parity_hf.py --data ... --device cuda --bf16   # on a GPU

Shape: `--override dim=256 n_layers=12 ...` on `--preset` (default: a 12x256 variant of 125M).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a prepared dataset folder (mobilellm prepare)")
    p.add_argument("--preset", default="mobilellm-125m")
    p.add_argument("--override", nargs="*", default=["dim=256", "n_layers=12", "n_heads=8", "n_kv_heads=2",
                                                     "ffn_dim=704", "max_seq_len=256"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write both curves here as JSON")
    args = p.parse_args()

    import contextlib

    import torch
    import transformers

    from mobilellm.checkpoint import save_model_dir
    from mobilellm.data.loader import PackedTokens
    from mobilellm.model import MobileLLM
    from mobilellm.train import config as train_config
    from mobilellm.train.optim import build_optimizer, lr_at
    from mobilellm.train.trainer import CausalLMLoss

    data = PackedTokens(args.data, "train", args.seq_len)
    cfg = train_config.load(None, [f"model.preset={args.preset}", f"model.overrides.vocab_size={data.vocab_size}",
                                   *(f"model.overrides.{item}" for item in args.override)]).model_config()
    tcfg = train_config.load(None, [f"schedule.warmup_steps={args.warmup}", "schedule.kind=cosine",
                                    f"optim.lr={args.lr}", "data.train=[x]", f"run.max_steps={args.steps}"])
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    ours = MobileLLM(cfg)
    with tempfile.TemporaryDirectory() as tmp:  # the same initial weights, through the model directory
        save_model_dir(ours, Path(tmp) / "m")
        theirs = transformers.LlamaForCausalLM.from_pretrained(Path(tmp) / "m", dtype=torch.float32)
    ours.to(device).train()
    theirs.to(device).train()
    loss_ours = CausalLMLoss(ours, tcfg.run.loss_chunk_tokens, torch.bfloat16 if args.bf16 else torch.float32)
    opt_ours = build_optimizer(ours, tcfg, args.lr, device)
    decay = [p for n, p in theirs.named_parameters() if p.ndim >= 2]  # the usual recipe: no decay on norms
    no_decay = [p for n, p in theirs.named_parameters() if p.ndim < 2]
    opt_theirs = torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.optim.weight_decay},
                                    {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
                                   betas=tuple(tcfg.optim.betas), eps=tcfg.optim.eps)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    rng = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(data), generator=rng)[: args.steps * args.batch].tolist()
    curves = {"ours": [], "transformers": []}
    started = time.perf_counter()
    for step in range(args.steps):
        batch = torch.stack([torch.as_tensor(data[i]) for i in order[step * args.batch:(step + 1) * args.batch]])
        x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)
        lr = lr_at(step, args.steps, args.lr, tcfg)
        for name, model, opt, loss_fn in (("ours", ours, opt_ours, lambda: loss_ours(x, y)),
                                          ("transformers", theirs, opt_theirs,
                                           lambda: torch.nn.functional.cross_entropy(
                                               theirs(input_ids=x).logits.float().flatten(0, 1), y.flatten()))):
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast():
                loss = loss_fn()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            curves[name].append(loss.item())
    diffs = [abs(a - b) for a, b in zip(curves["ours"], curves["transformers"])]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    print(f"{args.steps} steps of {args.batch} x {args.seq_len} tokens, {cfg.n_layers}x{cfg.dim}, "
          f"{'bf16' if args.bf16 else 'fp32'} on {device} ({time.perf_counter() - started:.0f} s)")
    for step in sorted({0, 9, 24, 49, args.steps - 1} & set(range(args.steps))):
        print(f"step {step + 1:4d}: ours {curves['ours'][step]:.4f}  transformers {curves['transformers'][step]:.4f}")
    print(f"largest difference: {diffs[worst]:.2e} nats at step {worst + 1}; "
          f"mean over the last 10 steps: {sum(diffs[-10:]) / len(diffs[-10:]):.2e}")
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), **curves}, indent=1))


if __name__ == "__main__":
    main()
