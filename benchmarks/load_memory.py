"""Peak memory while loading a model directory for generation: ours (native backend) and llama.cpp.

    python benchmarks/load_memory.py                    # MobileLLM-125M shape, fp32 / int8 / int4, 2 runs each
    python benchmarks/load_memory.py --repeats 1 --no-llama
    python benchmarks/load_memory.py --baseline-src OTHER_CHECKOUT/src   # also the rows of another version

One random-weight fp32 model directory (vocab 32000, seed 0) is saved once. Every case runs in a
fresh subprocess: load (mobilellm.inference.load_engine, native backend, `--max-len` cache) and an
8-token prefill, so every weight has been read; then the process's peak RSS (VmHWM; ru_maxrss where
there is no /proc) is compared with the weights as the engine holds them at that precision
(Engine.weight_bytes) and with the budget 1.15 x those bytes + 250 MiB (torch alone is about
220 MiB). llama.cpp (llama-cpp-python, which maps the file) runs on GGUF exports of the same
weights (F32 / Q8_0 / Q4_0) with the same prefill, where llama_cpp and gguf import and the LLaMA-2
tokenizer (a GGUF file needs one) is in the shared data. The prefill's logits sum is printed, so
runs of two versions can be checked for identical results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 2**20
PRECISIONS = ("fp32", "int8", "int4")
GGUF_QUANT = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}
PROMPT = [5, 17, 123, 999, 4242, 31000, 7, 64]
REPO = Path(__file__).resolve().parents[1]
# a GGUF file must carry a tokenizer with every byte token; decode_cpu.py uses the same one
LLAMA2_TOKENIZER = REPO.parent / "shared" / "data" / "tokenizers" / "llama2"


def peak_rss() -> int:
    # this worker's own peak (VmHWM): ru_maxrss would carry over the driver's from fork
    from mobilellm.sysinfo import peak_rss_bytes

    return peak_rss_bytes()


def rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def budget(weight_bytes: int) -> float:
    return 1.15 * weight_bytes + 250 * MiB


# ---- workers (one per subprocess) ---------------------------------------------------------------


def work_ours(a) -> dict:
    from mobilellm.inference import load_engine

    t = time.perf_counter()
    eng = load_engine(a.model_dir, need_tokenizer=False, backend="native", precision=a.precision,
                      max_len=a.max_len, threads=a.threads)
    load_s = time.perf_counter() - t
    logits = eng.backend.prefill(0, PROMPT)
    return {"load_s": load_s, "rss_end": rss_now(), "weight_bytes": eng.weight_bytes(), "cache_bytes": eng.cache_bytes(),
            "logits_sum": float(logits.double().sum()), "logits_head": [round(float(x), 5) for x in logits[:4]]}


def work_build(a) -> dict:
    """The random-weight model directory (in a worker: the driver stays small, see peak_rss)."""
    import torch

    from mobilellm.checkpoint import save_model_dir
    from mobilellm.config import get_preset
    from mobilellm.model import MobileLLM

    torch.manual_seed(0)
    model = MobileLLM(get_preset(a.preset, vocab_size=32000, bos_token_id=None, eos_token_id=None))
    save_model_dir(model, a.model_dir, tokenizer=a.tokenizer)
    return {}


def work_gguf_export(a) -> dict:
    from mobilellm.checkpoint import load_model_dir
    from mobilellm.export.gguf import export_gguf

    info = export_gguf(load_model_dir(a.model_dir), a.model_dir, a.gguf, quant=a.quant)
    return {"bytes": info["bytes"]}


def work_llamacpp(a) -> dict:
    from llama_cpp import Llama

    t = time.perf_counter()
    llm = Llama(model_path=a.gguf, n_ctx=a.max_len, n_threads=a.threads, n_threads_batch=a.threads,
                n_batch=len(PROMPT), verbose=False)
    load_s = time.perf_counter() - t
    llm.eval(PROMPT)
    return {"load_s": load_s, "rss_end": rss_now()}


def worker_main(a) -> None:
    workers = {"ours": work_ours, "llamacpp": work_llamacpp, "gguf_export": work_gguf_export, "build": work_build}
    result = workers[a.worker](a)
    result["peak_rss"] = peak_rss()
    print("RESULT " + json.dumps(result), flush=True)


# ---- driver -------------------------------------------------------------------------------------


def spawn(worker: str, args: list[str], threads: int, src: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    if src:  # another checkout's package, for before/after rows
        env["PYTHONPATH"] = src
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--threads", str(threads), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit {proc.returncode}"}


def llama_available() -> bool:
    return subprocess.run([sys.executable, "-c", "import llama_cpp, gguf"], capture_output=True).returncode == 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mobilellm-125m")
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--repeats", type=int, default=2, help="subprocesses per case (each row lists them all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-len", type=int, default=128, help="KV cache length (the cache is in the peak)")
    p.add_argument("--work-dir", default=None, help="where the model directory and GGUF files are kept "
                   "(reused when present); default a temporary folder")
    p.add_argument("--no-llama", action="store_true", help="skip the llama.cpp rows")
    p.add_argument("--baseline-src", default=None, help="the src/ folder of another version of this project: "
                   "its rows run beside this one's")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--precision", default=None, help=argparse.SUPPRESS)
    p.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    p.add_argument("--quant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker_main(a)
        return

    tmp = None if a.work_dir else tempfile.TemporaryDirectory(prefix="load-memory-")
    root = Path(a.work_dir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = LLAMA2_TOKENIZER if (LLAMA2_TOKENIZER / "tokenizer.model").exists() else None
    model_dir = root / a.preset
    if not (model_dir / "config.json").exists():
        spawn("build", ["--model-dir", str(model_dir), "--preset", a.preset]
              + (["--tokenizer", str(tokenizer)] if tokenizer else []), a.threads)
    common = ["--model-dir", str(model_dir), "--max-len", str(a.max_len)]
    versions = [("ours", None)] + ([("baseline", a.baseline_src)] if a.baseline_src else [])
    rows = []
    for precision in a.precisions.split(","):
        for label, src in versions:
            runs = [spawn("ours", common + ["--precision", precision], a.threads, src) for _ in range(a.repeats)]
            rows.append((f"{label} {precision}", runs))
        if not a.no_llama and tokenizer and llama_available():
            gguf = root / f"{a.preset}-{GGUF_QUANT[precision]}.gguf"
            if not gguf.exists():
                spawn("gguf_export", common + ["--gguf", str(gguf), "--quant", GGUF_QUANT[precision]], a.threads)
            runs = [spawn("llamacpp", common + ["--gguf", str(gguf)], a.threads) for _ in range(a.repeats)]
            rows.append((f"llama.cpp {GGUF_QUANT[precision].upper()}", runs))

    print(f"\n{a.preset}, random weights, cache {a.max_len} tokens, {a.threads} threads, {a.repeats} runs per row\n")
    print("| case | weights MiB | budget MiB | peak RSS MiB (runs) | within budget | RSS after MiB | load s | logits sum |")
    print("|---|---|---|---|---|---|---|---|")
    for name, runs in rows:
        bad = [r["error"] for r in runs if "error" in r]
        if bad:
            print(f"| {name} | error: {bad[0]} |")
            continue
        peaks = [r["peak_rss"] / MiB for r in runs]
        w = runs[0].get("weight_bytes")
        limit = budget(w) / MiB if w else None
        fmt = "/".join(f"{x:.0f}" for x in peaks)
        print(f"| {name} | {w / MiB:.0f} | {limit:.0f} | {fmt} | {'yes' if max(peaks) <= limit else 'NO'} "
              if w else f"| {name} | - | - | {fmt} | - ", end="")
        print(f"| {statistics.median(r['rss_end'] for r in runs) / MiB:.0f} "
              f"| {statistics.median(r['load_s'] for r in runs):.2f} | {runs[0].get('logits_sum', '-')} |")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
