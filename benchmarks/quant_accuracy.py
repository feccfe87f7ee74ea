"""Accuracy cost of post-training quantization: perplexity and zero-shot accuracy, fp32/bf16 vs each scheme.

For a trained model directory (`--model`), or, when none exists yet, a small model trained here
for `--train-steps` steps on the shared Gutenberg corpus (say so when you report its numbers).
Every scheme is applied by `mobilellm.quantize.quantize_model` and evaluated on the same data:
held-out perplexity (the model's own validation split with `--manifest <prepared data>`, else
Gutenberg's held-out books in non-overlapping windows) and, with `--tasks`, the zero-shot tasks of
`mobilellm eval` on the same documents (`--limit` per task). The paper's bar: W8A8 costs <= 0.5
points of average zero-shot accuracy; loss/perplexity deltas are the finer-grained signal for small
models whose accuracy is near chance, and "flipped" counts the documents whose prediction changed.

    python benchmarks/quant_accuracy.py --train-steps 400 --save-model /tmp/qa-model
    python benchmarks/quant_accuracy.py --model runs/quickstart/run/final --manifest runs/quickstart/data \
        --tasks paper --limit 500
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mobilellm.checkpoint import quantized_state_dict
from mobilellm.quantize import quantize_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SCHEMES = [("fp32", None, "none"), ("bf16", "bf16", "none"), ("w8a8", "w8a8", "none"), ("w8a8 + int8 embedding", "w8a8", "int8"),
           ("int8 weight-only", "int8", "none"), ("8da4w g32", "8da4w", "none"), ("8da4w g32 + int4 emb.", "8da4w", "int4")]


def gutenberg_texts(split: str, max_chars: int) -> list[str]:
    import zstandard

    name = "valid.jsonl.zst" if split == "valid" else "train-00.jsonl.zst"
    texts, total = [], 0
    with open(SHARED / "corpus" / "gutenberg_top100" / name, "rb") as fh:
        for line in io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(fh), encoding="utf-8"):
            text = json.loads(line)["text"][: max_chars - total]
            texts.append(text)
            total += len(text)
            if total >= max_chars:
                break
    return texts


def train_small_model(steps: int, out: Path, preset: str, seq_len: int = 128, batch: int = 16):
    """A small model on ~2 MB of Gutenberg text with our BPE tokenizer (2048 tokens)."""
    from mobilellm.checkpoint import save_model_dir
    from mobilellm.config import get_preset
    from mobilellm.model import MobileLLM
    from mobilellm.tokenizer import train_tokenizer

    texts = gutenberg_texts("train", 2_000_000)
    tok = train_tokenizer(texts, vocab_size=2048)
    ids = torch.tensor([i for t in texts for i in tok.encode(t, eos=True)])
    # ffn_dim a multiple of 32 so that 8da4w's groups fit every layer
    cfg = get_preset(preset, vocab_size=tok.vocab_size, ffn_dim=192 if "tiny" in preset else 512,
                     bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    model = MobileLLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    started = time.perf_counter()
    for step in range(steps):
        lr = 3e-3 * min(1, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,))
        x = torch.stack([ids[s:s + seq_len] for s in starts])
        y = torch.stack([ids[s + 1:s + seq_len + 1] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step} loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    save_model_dir(model.eval(), out, tokenizer=tok)
    return out


def weight_mib(model) -> float:
    state = quantized_state_dict(model) if getattr(model, "quantization", None) else model.state_dict()
    return sum(t.numel() * t.element_size() for t in state.values()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="trained model directory")
    ap.add_argument("--train-steps", type=int, default=400, help="without --model: train a small model this long")
    ap.add_argument("--save-model", default="/tmp/mobilellm-qa-model")
    ap.add_argument("--preset", default="mobilellm-tiny-ls", help="shape of the model trained here")
    ap.add_argument("--eval-chars", type=int, default=400_000, help="characters of held-out Gutenberg text")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--manifest", default=None, help="prepared data folder: perplexity on its validation split")
    ap.add_argument("--tasks", default=None, help="zero-shot tasks too, e.g. paper or arc_easy,piqa")
    ap.add_argument("--limit", type=int, default=None, help="documents per zero-shot task")
    ap.add_argument("--data-dir", default=str(SHARED / "eval"), help="folder with the task files")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from mobilellm.checkpoint import load_model_dir
    from mobilellm.eval.evaluator import evaluate, headline
    from mobilellm.eval.perplexity import windows_perplexity
    from mobilellm.tokenizer import load_tokenizer

    model_dir = Path(args.model) if args.model else None
    if model_dir is None:
        print(f"no --model: training a small model for {args.train_steps} steps", flush=True)
        model_dir = train_small_model(args.train_steps, Path(args.save_model), args.preset)
    tok = load_tokenizer(model_dir)
    base = load_model_dir(model_dir)
    ids = None if args.manifest else [i for t in gutenberg_texts("valid", args.eval_chars) for i in tok.encode(t, eos=True)]
    window = min(args.window, base.config.max_seq_len)
    rows = []
    for label, scheme, embedding in SCHEMES:
        if scheme is None:
            model = base
        elif scheme == "bf16":
            model = copy.deepcopy(base).to(torch.bfloat16)
        else:
            model = quantize_model(copy.deepcopy(base), scheme, embedding=embedding)
        started = time.perf_counter()
        row = {"scheme": label, "weights_mib": weight_mib(model)}
        with torch.inference_mode():
            if args.manifest:
                res = evaluate(model, tok, ["val"], manifest=args.manifest, seq_len=window)["results"]["val"]
            else:
                res = windows_perplexity(model, ids, window=window)
            row.update(loss=res["loss"], perplexity=math.exp(res["loss"]), tokens=res["tokens"])
            if args.tasks:
                report = evaluate(model, tok, args.tasks, data_dir=args.data_dir, limit=args.limit, batch_size=32,
                                  per_example=True)
                row["tasks"] = {name: {"acc": 100 * headline(name, r), "n": r["n"], "correct": r["correct"]}
                                for name, r in report["results"].items()}
                row["zero_shot_avg"] = sum(t["acc"] for t in row["tasks"].values()) / len(row["tasks"])
        rows.append(row)
        print(f"  {label}: loss {row['loss']:.4f}" + (f", zero-shot avg {row['zero_shot_avg']:.2f}" if args.tasks
              else "") + f" ({time.perf_counter() - started:.0f} s)", flush=True)
    ref = rows[0]
    where = f"validation split of {args.manifest}" if args.manifest else "held-out Gutenberg books"
    print(f"\nmodel {model_dir}: {base.num_params():,} params; {ref['tokens']:,} tokens of the {where}, "
          f"windows of {window}\n")
    tasks = list(ref.get("tasks", {}))
    head = "| scheme | loss (nats) | perplexity | Δ loss | Δ perplexity | weights MiB | size vs fp32 |"
    if tasks:
        head += " " + " | ".join(tasks) + " | zero-shot avg | Δ avg (points) | flipped |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        line = (f"| {r['scheme']} | {r['loss']:.4f} | {r['perplexity']:.2f} | {r['loss'] - ref['loss']:+.4f} | "
                f"{100 * (r['perplexity'] / ref['perplexity'] - 1):+.2f}% | {r['weights_mib']:.2f} | "
                f"{r['weights_mib'] / ref['weights_mib']:.2f}x |")
        if tasks:
            flipped = sum(a != b for t in tasks for a, b in zip(r["tasks"][t]["correct"], ref["tasks"][t]["correct"]))
            n = sum(ref["tasks"][t]["n"] for t in tasks)
            line += (" " + " | ".join(f"{r['tasks'][t]['acc']:.1f}" for t in tasks) +
                     f" | {r['zero_shot_avg']:.2f} | {r['zero_shot_avg'] - ref['zero_shot_avg']:+.2f} | {flipped}/{n} |")
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
