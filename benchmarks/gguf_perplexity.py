"""WikiText-2 perplexity of a converted GGUF model: `mobilellm eval`'s windows in PyTorch beside
llama.cpp (llama-cpp-python) running the original GGUF on the same token windows.

Both score every window the same way (non-overlapping windows, window-1 predictions each, mean of
the window means), so the difference is the runtime and the original file's quantized arithmetic.

  python benchmarks/gguf_perplexity.py --model runs/smollm2 --gguf path/to/model.gguf --window 2048 --windows 4
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def llama_cpp_ppl(gguf_path: str, ids: list[int], window: int, windows: int, threads: int) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf_path, n_ctx=window, n_batch=512, n_threads=threads, logits_all=True,
                          type_k=0, type_v=0, verbose=False)  # f32 KV cache, as our model computes
    means = []
    try:
        for w in range(windows):
            chunk = ids[w * window:(w + 1) * window]
            llm.reset()
            llm.eval(chunk)
            logits = np.asarray(llm.scores[: window - 1], dtype=np.float64)
            top = logits.max(-1, keepdims=True)
            logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
            means.append(-float(logp[np.arange(window - 1), chunk[1:]].mean()))
    finally:
        llm.close()
    return math.exp(sum(means) / len(means))


def main() -> int:
    from mobilellm.checkpoint import load_model_and_tokenizer
    from mobilellm.eval import tasks as T
    from mobilellm.eval.perplexity import windows_perplexity
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the converted model directory")
    p.add_argument("--gguf", required=True, help="the GGUF file it was converted from")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "eval"))
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(args.model)
    ids = tok.encode(T.read_wikitext(Path(args.data_dir)), bos=tok.add_bos)
    started = time.perf_counter()
    ours = windows_perplexity(model, ids, window=args.window, limit=args.windows, batch_size=1)
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    theirs = llama_cpp_ppl(args.gguf, ids, args.window, ours["windows"], args.threads)
    print(f"wikitext2, {ours['windows']} windows of {args.window} ({ours['tokens']} predictions): "
          f"mobilellm {ours['ppl']:.4f} ({ours_s:.0f} s), llama.cpp on {Path(args.gguf).name} {theirs:.4f} "
          f"({time.perf_counter() - started:.0f} s), diff {100 * (ours['ppl'] / theirs - 1):+.3f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
