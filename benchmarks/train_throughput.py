"""Training throughput: our trainer's step vs transformers' LlamaForCausalLM, same shape, same run.

Each configuration runs in its own subprocess (clean peak-memory counters) for a fixed number of
optimizer steps on random tokens; the first steps (compilation, allocator warm-up) are not timed.

    python benchmarks/train_throughput.py --presets mobilellm-125m mobilellm-350m --global-batch 32

`--variants` compares implementation choices of ours in the same run: default (the trainer's
defaults), flash (cuDNN attention off, so SDPA takes FlashAttention-2), cdt (Inductor's
coordinate-descent tuning of its generated kernels), or both (flash+cdt).

`--nproc 1 2 4 8 [--strategies ddp fsdp]` measures multi-GPU scaling of `mobilellm train` under
torchrun instead (benchmarks/train_scaling.py says how).

Ours: MobileLLM blocks compiled one by one, bf16 autocast with a bf16 residual stream, SDPA (flash) attention, fused linear +
cross-entropy (no full logits tensor), fused AdamW, grad-clip 1.0 -- the code path of
`mobilellm train`. Baseline: transformers LlamaForCausalLM with the same shape and tied
embeddings, SDPA, bf16 autocast, torch.compile, AdamW, its own loss (`labels=`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import train_scaling  # noqa: E402 (beside this file)


def worker(args) -> dict:
    import torch

    from mobilellm.train import config as train_config
    from mobilellm.train.trainer import measure_peak_tflops

    torch.manual_seed(0)
    device = torch.device("cuda")
    # any shape: --override dim=256 n_layers=28 ..., read by the trainer's own override parser
    cfg = train_config.load(None, [f"model.preset={args.preset}",
                                   *(f"model.overrides.{item}" for item in args.override or [])]).model_config()
    T, micro, accum = args.seq_len, args.micro_batch, args.global_batch // args.micro_batch
    data = torch.randint(0, cfg.vocab_size, (accum * micro, T + 1), device=device)

    if args.worker == "ours":
        from mobilellm.model import MobileLLM
        from mobilellm.train.config import TrainConfig
        from mobilellm.train.optim import build_optimizer
        from mobilellm.train.trainer import CausalLMLoss

        model = MobileLLM(cfg).to(device).train()
        variant = set(args.variant.split("+"))
        if "flash" in variant:
            torch.backends.cuda.enable_cudnn_sdp(False)
        if "cdt" in variant:
            import torch._inductor.config as inductor_config

            inductor_config.coordinate_descent_tuning = True
        model.activation_checkpointing = args.ac
        loss_module = CausalLMLoss(model, args.loss_chunk, torch.bfloat16)
        model.residual_dtype = torch.bfloat16  # the trainer's default under bf16 (run.fp32_residual: false)
        if "graphs" in variant:  # the whole forward as one compiled graph replayed as CUDA graphs
            compiled_loss = torch.compile(loss_module, mode="reduce-overhead")
        elif "whole" in variant:  # the whole forward as one compiled graph, kernels launched one by one
            compiled_loss = torch.compile(loss_module)
        else:
            for block in model.layers:
                block.compile()
            compiled_loss = loss_module
        optimizer = build_optimizer(model, TrainConfig(), 1e-3, device)

        def forward_loss(x, y):
            if "graphs" in variant:
                torch.compiler.cudagraph_mark_step_begin()
            return compiled_loss(x, y)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                             num_hidden_layers=cfg.n_logical_layers, num_attention_heads=cfg.n_heads,
                             num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                             tie_word_embeddings=True, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta)
        hf_cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(hf_cfg).to(device).train()
        compiled = torch.compile(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)

        def forward_loss(x, y):
            return compiled(input_ids=x, labels=x).loss  # HF shifts the labels itself

    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for i in range(accum):
            batch = data[i * micro:(i + 1) * micro]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = forward_loss(batch[:, :-1], batch[:, 1:])
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    t_compile = time.perf_counter()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    t_compile = time.perf_counter() - t_compile
    if os.environ.get("BENCH_PROFILE"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70),
              file=sys.stderr)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss.item()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    tokens = args.steps * args.global_batch * T
    tok_s = tokens / elapsed
    peak = measure_peak_tflops(device)
    flops = 3 * cfg.flops_per_token(T)
    return {
        "impl": args.worker if args.worker == "hf" else f"ours ({args.variant})",
        "preset": args.preset + (f" {cfg.n_layers}x{cfg.dim}" if args.override else ""),
        "micro_batch": micro, "grad_accum": accum, "ac": args.ac,
        "tok_s": tok_s, "step_ms": 1000 * elapsed / args.steps, "mfu": tok_s * flops / (peak * 1e12),
        "peak_tflops": peak, "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "warmup_s": t_compile,
        "loss": loss.item(), "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["mobilellm-125m", "mobilellm-350m"])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--global-batch", type=int, default=32, help="sequences per optimizer step")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[16], help="our micro-batch sizes to try")
    p.add_argument("--baseline-micro-batch", type=int, default=None, help="default: the global batch")
    p.add_argument("--ac", action="store_true", help="also try ours with activation checkpointing")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--loss-chunk", type=int, default=8192)
    p.add_argument("--variants", nargs="+", default=["default"],
                   help="ours: default, flash, cdt, flash+cdt, whole (one compiled graph) or graphs "
                        "(one graph replayed as CUDA graphs)")
    p.add_argument("--override", nargs="+", default=None, metavar="KEY=VALUE",
                   help="model config fields applied to every preset, e.g. dim=256 n_layers=28")
    p.add_argument("--output", default=None, help="append JSON lines here")
    p.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--micro-batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    train_scaling.add_arguments(p)
    args = p.parse_args()
    if args.nproc:
        train_scaling.run_scaling(args)
        return
    if args.worker:
        args.ac = bool(int(os.environ.get("BENCH_AC", "0")))
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    runs = []
    for preset in args.presets:
        plan = [("ours", mb, False, v) for v in args.variants for mb in args.micro_batches]
        if args.ac:
            plan += [("ours", mb, True, "default") for mb in args.micro_batches]
        if not args.no_baseline:
            plan.append(("hf", args.baseline_micro_batch or args.global_batch, False, "default"))
        for impl, mb, ac, variant in plan:
            cmd = [sys.executable, __file__, "--worker", impl, "--preset", preset, "--micro-batch", str(mb),
                   "--variant", variant, *(["--override", *args.override] if args.override else []),
                   "--seq-len", str(args.seq_len), "--global-batch", str(args.global_batch),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--loss-chunk", str(args.loss_chunk)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "BENCH_AC": str(int(ac))})
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if lines:
                result = json.loads(lines[-1][7:])
            else:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                result = {"impl": impl if impl == "hf" else f"ours ({variant})", "preset": preset, "micro_batch": mb, "ac": ac, "error": err[:200]}
            runs.append(result)
            print(json.dumps(result), flush=True)
            if args.output:
                with open(args.output, "a") as fh:
                    fh.write(json.dumps(result) + "\n")

    print("\n| model | impl | micro x accum | act. ckpt | tok/s | MFU | peak alloc GiB | vs baseline tok/s | mem ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        if "error" in r:
            print(f"| {r['preset']} | {r['impl']} | {r['micro_batch']} | {r['ac']} | error: {r['error']} | | | | |")
            continue
        base = next((b for b in runs if b["preset"] == r["preset"] and b["impl"] == "hf" and "error" not in b), None)
        ratio = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else "n/a"
        mem = f"{r['peak_alloc_gib'] / base['peak_alloc_gib']:.2f}" if base else "n/a"
        print(f"| {r['preset']} | {r['impl']} | {r['micro_batch']}x{r['grad_accum']} | {r['ac']} | "
              f"{r['tok_s']:,.0f} | {r['mfu']:.1%} | {r['peak_alloc_gib']:.1f} | {ratio} | {mem} |")


if __name__ == "__main__":
    main()
