"""Accuracy cost of post-training quantization: held-out perplexity at fp32 vs each scheme.

For a trained model directory (`--model`), or, when none exists yet, a small model trained here
for `--train-steps` steps on the shared Gutenberg corpus (say so when you report its numbers).
Every scheme is applied by `mobilellm.quantize.quantize_model` and evaluated with the same windows
(`mobilellm.eval.perplexity.windows_perplexity`: non-overlapping windows, mean cross-entropy).
The paper's bar: W8A8 costs <= 0.5 points of average zero-shot accuracy; loss/perplexity deltas are
the finer-grained signal for small models whose accuracy is near chance.

    python benchmarks/quant_accuracy.py --train-steps 400 --save-model /tmp/qa-model
    python benchmarks/quant_accuracy.py --model /tmp/qa-model
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

from mobilellm.quantize import quantize_model, quantized_state_dict

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SCHEMES = [("fp32", None, "none"), ("w8a8", "w8a8", "none"), ("w8a8 + int8 embedding", "w8a8", "int8"),
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
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from mobilellm.checkpoint import load_model_dir
    from mobilellm.eval.perplexity import windows_perplexity
    from mobilellm.tokenizer import load_tokenizer

    model_dir = Path(args.model) if args.model else None
    if model_dir is None:
        print(f"no --model: training a small model for {args.train_steps} steps", flush=True)
        model_dir = train_small_model(args.train_steps, Path(args.save_model), args.preset)
    tok = load_tokenizer(model_dir)
    ids = [i for t in gutenberg_texts("valid", args.eval_chars) for i in tok.encode(t, eos=True)]
    base = load_model_dir(model_dir)
    window = min(args.window, base.config.max_seq_len)
    rows = []
    for label, scheme, embedding in SCHEMES:
        model = base if scheme is None else quantize_model(copy.deepcopy(base), scheme, embedding=embedding)
        with torch.inference_mode():
            result = windows_perplexity(model, ids, window=window)
        loss = result["loss"]
        rows.append({"scheme": label, "loss": loss, "perplexity": math.exp(loss), "weights_mib": weight_mib(model)})
        print(f"  {label}: loss {loss:.4f}", flush=True)
    ref = rows[0]
    print(f"\nmodel {model_dir.name}: {base.num_params():,} params; {len(ids):,} held-out tokens, windows of {window}\n")
    print("| scheme | loss (nats) | perplexity | Δ loss | Δ perplexity | weights MiB | size vs fp32 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['loss']:.4f} | {r['perplexity']:.2f} | {r['loss'] - ref['loss']:+.4f} | "
              f"{100 * (r['perplexity'] / ref['perplexity'] - 1):+.2f}% | {r['weights_mib']:.2f} | "
              f"{r['weights_mib'] / ref['weights_mib']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
