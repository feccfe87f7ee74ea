"""CPU decode speed and memory: mobilellm's engine against transformers and llama.cpp, same weights, same run.

    python benchmarks/decode_cpu.py                      # MobileLLM-125M shape, 32-token prompt, 128 new tokens
    python benchmarks/decode_cpu.py --threads 2 --repeats 3 --skip-compile
    python benchmarks/decode_cpu.py --model runs/smollm2 --gguf smollm2   # a real model, real-text prompt

With --model DIR the rows run on that model directory instead: the prompt is PROMPT_TEXT in its own
tokenizer's ids, ours runs the native backend only (no layer-shared twin), llama.cpp runs on our GGUF
exports of DIR and on --gguf FILE (a .gguf path, or a `mobilellm convert` shorthand such as `smollm2`).

One random-weight model (vocab 32000, seed 0) is saved once as a model directory (a plain Llama
that transformers loads) and, for the layer-sharing overhead, as 125M-LS. Every engine runs in its
own subprocess, so peak RSS is its own: load + warm-up + timed run.

  transformers  LlamaForCausalLM.generate, greedy, fp32 (the baseline for "x HF")
  ours          mobilellm.inference.Engine: fp32 / bf16 / fp16 / int8 / int4, native backend ("ours fp32") and the
                torch backend ("ours fp32 torch": oneDNN / fbgemm kernels, eager or compiled)
  llama.cpp     llama-cpp-python on GGUF files written by mobilellm.export.gguf (F32 / F16 / Q8_0 / Q4_0);
                runs when a Python with `llama_cpp` and the exporter is found (--llama-python, or the
                project's export virtual environment); needs a tokenizer with all byte tokens in the
                model directory (the LLaMA-2 tokenizer.model from the shared data), else "not run".

Decode tok/s = (new tokens - 1) / time from the first generated token to the last (prefill excluded);
greedy, never stopping early. Prints a markdown table with ratios to transformers and to llama.cpp at
the matching precision (fp32~F32, fp16 and bf16~F16, int8~Q8_0, int4~Q4_0), and the layer-sharing
overhead (125M-LS against 125M) at fp32, int8 and int4.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLAMA2_TOKENIZER = REPO.parent / "shared" / "data" / "tokenizers" / "llama2" / "tokenizer.model"
PROMPT_TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
               "movable metal type, oil-based ink and a wooden screw press. Within fifty years, presses ran in "
               "more than two hundred European cities, and books became cheap enough for ordinary readers. ")
MATCHING_GGUF = {"fp32": "f32", "fp16": "f16", "bf16": "f16", "int8": "q8_0", "int4": "q4_0"}


def rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    # this worker's own peak (VmHWM): ru_maxrss would carry over the driver's from fork
    from mobilellm.sysinfo import peak_rss_bytes

    return peak_rss_bytes()


def prompt_ids(a, vocab: int) -> list[int]:
    if a.prompt_ids:  # --model: real text, tokenized once by the driver
        return [int(t) for t in a.prompt_ids.split(",")]
    import random

    rng = random.Random(0)
    return [rng.randrange(3, vocab) for _ in range(a.prompt_tokens)]


# ---- workers (one per subprocess) -------------------------------------------------------------


def work_ours(a) -> dict:
    import torch

    try:
        from mobilellm.inference import SamplingParams, load_engine
        precision = {"precision": a.weights}
    except ImportError:  # --baseline-src: a version of the project from before the inference package
        from mobilellm.generate import SamplingParams, load_engine
        precision = {"weights": a.weights}

    torch.set_num_threads(a.threads)
    t = time.perf_counter()
    eng = load_engine(a.model_dir, compile=a.compile, threads=a.threads, max_len=a.prompt_tokens + a.new_tokens,
                      need_tokenizer=False, backend=a.backend, **precision)
    load_s = time.perf_counter() - t
    prompt = prompt_ids(a, eng.config.vocab_size)
    t = time.perf_counter()
    eng.generate([prompt], SamplingParams(max_new_tokens=16, ignore_eos=True))  # warm-up (and compile)
    warm_s = time.perf_counter() - t
    req = eng.submit(eng.make_request(prompt, SamplingParams(max_new_tokens=a.new_tokens, ignore_eos=True)))
    t0 = time.perf_counter()
    eng.step()  # prefill + first token
    t1 = time.perf_counter()
    while eng.has_work():
        eng.step()
    t2 = time.perf_counter()
    assert len(req.output_ids) == a.new_tokens
    return {"decode_tok_s": (a.new_tokens - 1) / (t2 - t1), "prefill_s": t1 - t0, "load_s": load_s,
            "warmup_s": warm_s, "weights_mib": eng.weight_bytes() / 2**20, "cache_mib": eng.cache_bytes() / 2**20,
            "tokens": req.output_ids[:8]}


def work_hf(a) -> dict:
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(a.threads)

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t
    ids = torch.tensor([prompt_ids(a, model.config.vocab_size)])
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=16, min_new_tokens=16, **kw)  # warm-up
        clock = Clock()
        out = model.generate(ids, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, streamer=clock, **kw)
    # streamer.put: first the prompt, then one call per generated token
    first, last = clock.times[1], clock.times[-1]
    return {"decode_tok_s": (a.new_tokens - 1) / (last - first), "prefill_s": first - clock.times[0],
            "load_s": load_s, "tokens": out[0, a.prompt_tokens:a.prompt_tokens + 8].tolist()}


def work_gguf_export(a) -> dict:
    from mobilellm.checkpoint import load_model_dir
    from mobilellm.export.gguf import export_gguf

    model = load_model_dir(a.model_dir)
    info = export_gguf(model, a.model_dir, a.gguf, quant=a.quant)
    return {"bytes": info["bytes"]}


def work_llamacpp(a) -> dict:
    from llama_cpp import Llama

    t = time.perf_counter()
    llm = Llama(model_path=a.gguf, n_ctx=a.prompt_tokens + a.new_tokens + 16, n_threads=a.threads,
                n_threads_batch=a.threads, n_batch=max(a.prompt_tokens, 8), verbose=False)
    load_s = time.perf_counter() - t
    prompt = prompt_ids(a, llm.n_vocab())

    def run(n):
        times, tokens = [], []
        llm.reset()  # else generate() reuses the warm-up's cached prompt and "prefill" is one token
        t0 = time.perf_counter()
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
            times.append(time.perf_counter())
            tokens.append(tok)
            if len(tokens) == n:
                break
        return t0, times, tokens

    run(16)  # warm-up
    t0, times, tokens = run(a.new_tokens)
    llm.close()
    return {"decode_tok_s": (a.new_tokens - 1) / (times[-1] - times[0]), "prefill_s": times[0] - t0,
            "load_s": load_s, "tokens": tokens[:8]}


def worker_main(a) -> None:
    fn = {"ours": work_ours, "hf": work_hf, "llamacpp": work_llamacpp, "gguf_export": work_gguf_export}[a.worker]
    result = fn(a)
    result.update(peak_rss_mib=peak_rss() / 2**20, rss_end_mib=rss_now() / 2**20)
    print("RESULT " + json.dumps(result), flush=True)


# ---- driver -----------------------------------------------------------------------------------------


def spawn(python: str, worker: str, args: list[str], threads: int, timeout: float, src: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    if src:  # another checkout's package, for before/after rows
        env["PYTHONPATH"] = src
    cmd = [python, str(Path(__file__).resolve()), "--worker", worker, "--threads", str(threads), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit {proc.returncode}"}


def find_llama_python(explicit: str | None) -> str | None:
    candidates = [explicit] if explicit else [str(REPO / ".venv-export" / "bin" / "python"), sys.executable]
    for py in candidates:
        if py and Path(py).exists():
            ok = subprocess.run([py, "-c", "import llama_cpp, gguf, mobilellm.export.gguf"], capture_output=True)
            if ok.returncode == 0:
                return py
    return None


def build_models(root: Path, args) -> dict[str, Path]:
    import torch

    from mobilellm.checkpoint import save_model_dir
    from mobilellm.config import get_preset
    from mobilellm.model import MobileLLM

    dirs = {}
    tokenizer = LLAMA2_TOKENIZER.parent if LLAMA2_TOKENIZER.exists() else None
    for name in (args.preset, args.preset_ls):
        if not name:
            continue
        torch.manual_seed(0)
        model = MobileLLM(get_preset(name, vocab_size=32000, bos_token_id=None, eos_token_id=None))
        dirs[name] = save_model_dir(model, root / name, tokenizer=tokenizer)
        del model
    return dirs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="runs per engine (median reported)")
    p.add_argument("--model", default=None, help="a model directory to benchmark instead of random weights")
    p.add_argument("--gguf", default=None, help="with --model: also run llama.cpp on this GGUF (a path or a "
                   "`mobilellm convert` shorthand such as smollm2)")
    p.add_argument("--preset", default="mobilellm-125m")
    p.add_argument("--preset-ls", default="mobilellm-125m-ls", help="layer-shared twin ('' to skip)")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--skip-torch-backend", action="store_true", help="only the native backend's rows for ours")
    p.add_argument("--only", default=None, help="comma-separated row names to run")
    p.add_argument("--llama-python", default=None, help="a Python with llama_cpp and mobilellm installed")
    p.add_argument("--baseline-src", default=None,
                   help="the src/ folder of another version of this project: each row of ours also runs on it "
                        "(same run, interleaved), named '... (baseline)'")
    p.add_argument("--json-out", default=None)
    p.add_argument("--timeout", type=float, default=1800)
    # worker-only arguments
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--weights", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="native", help=argparse.SUPPRESS)
    p.add_argument("--quant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prompt-ids", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker_main(a)

    if a.gguf and not a.model:
        p.error("--gguf needs --model")
    common = ["--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens)]
    tmp = Path(tempfile.mkdtemp(prefix="decode_cpu_"))
    if a.model:
        from mobilellm.checkpoint import load_config
        from mobilellm.tokenizer import load_tokenizer

        tok = load_tokenizer(a.model)
        text_ids = tok.encode(PROMPT_TEXT, bos=tok.add_bos)
        while len(text_ids) < a.prompt_tokens:
            text_ids += tok.encode(PROMPT_TEXT)
        common += ["--prompt-ids", ",".join(map(str, text_ids[:a.prompt_tokens]))]
        dirs, base, vocab = {}, a.model, load_config(a.model).vocab_size
    else:
        dirs = build_models(tmp, a)
        base, vocab = str(dirs[a.preset]), 32000
    # a real model: its native rows only (no torch-backend rows, no random layer-shared twin)
    torch_rows, compiled_rows = not (a.model or a.skip_torch_backend), not (a.model or a.skip_compile)
    ls_preset = "" if a.model else a.preset_ls
    rows: list[tuple[str, str, str, str, list[str]]] = [  # name, engine, precision, python, worker args
        ("transformers fp32", "hf", "fp32", sys.executable, ["--model-dir", base]),
    ]
    for w in ("fp32", "bf16", "fp16", "int8", "int4"):
        rows.append((f"ours {w}", "ours", w, sys.executable, ["--model-dir", base, "--weights", w]))
        if torch_rows:
            rows.append((f"ours {w} torch", "ours", w, sys.executable,
                         ["--model-dir", base, "--weights", w, "--backend", "torch"]))
        if compiled_rows:
            rows.append((f"ours {w} torch compiled", "ours", w, sys.executable,
                         ["--model-dir", base, "--weights", w, "--backend", "torch", "--compile"]))
    if ls_preset:
        for w in ("fp32", "int8", "int4"):
            rows.append((f"ours {w} {ls_preset.split('-')[-2]}-LS", "ours", w, sys.executable,
                         ["--model-dir", str(dirs[ls_preset]), "--weights", w]))
    llama_py = find_llama_python(a.llama_python)
    llama_note = None
    if llama_py is None:
        llama_note = "llama.cpp: not run (no Python with llama_cpp + mobilellm.export.gguf found)"
    elif not a.model and not LLAMA2_TOKENIZER.exists():
        llama_note = "llama.cpp: not run (GGUF export needs the LLaMA-2 tokenizer.model from the shared data)"
    else:
        for q in ("f32", "f16", "q8_0", "q4_0"):
            gguf_path = tmp / f"model-{q}.gguf"
            rows.append((f"llama.cpp {q.upper()}", "llamacpp", q, llama_py, ["--gguf", str(gguf_path)]))
        if a.gguf:
            from mobilellm.convert import resolve_source

            gguf_file = resolve_source(a.gguf)
            rows.append((f"llama.cpp {gguf_file.name}", "llamacpp", "file", llama_py, ["--gguf", str(gguf_file)]))
    if a.only:
        wanted = {s.strip() for s in a.only.split(",")}
        rows = [r for r in rows if r[0] in wanted]
    if a.baseline_src:
        rows = [row for r in rows for row in ([r, (f"{r[0]} (baseline)", *r[1:])] if r[1] == "ours" else [r])]

    results: dict[str, list[dict]] = {}
    for name, engine, precision, py, wargs in rows:
        if engine == "llamacpp" and precision != "file":
            made = spawn(py, "gguf_export", ["--model-dir", base, "--gguf", wargs[1], "--quant", precision],
                         a.threads, a.timeout)
            if "error" in made:
                results[name] = [made]
                print(f"{name}: export failed: {made['error']}", file=sys.stderr)
    # rounds over all engines (A B C, A B C, ...), so that a change in machine load hits every engine alike
    for r in range(a.repeats):
        for name, engine, precision, py, wargs in rows:
            if results.get(name) and "error" in results[name][0]:
                continue
            src = a.baseline_src if name.endswith("(baseline)") else None
            res = spawn(py, engine, wargs + common, a.threads, a.timeout, src)
            results.setdefault(name, []).append(res)
            print(f"{name} run {r + 1}: " + (res.get("error") or f"{res['decode_tok_s']:.1f} tok/s, "
                  f"peak RSS {res['peak_rss_mib']:.0f} MiB"), file=sys.stderr, flush=True)

    def median(name, key="decode_tok_s"):
        vals = [r[key] for r in results.get(name, []) if key in r]
        return statistics.median(vals) if vals else None

    hf = median("transformers fp32")
    what = f"{a.model} (real-text prompt)" if a.model else f"{a.preset} shape"
    print(f"\n{what}, vocab {vocab}, prompt {a.prompt_tokens}, {a.new_tokens} new tokens, greedy, "
          f"{a.threads} threads, {a.repeats} interleaved runs each (median; range in brackets)\n")
    print("| engine | decode tok/s | x transformers | x llama.cpp (same precision) | prefill ms | peak RSS MiB "
          "| RSS after MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, engine, precision, _, _ in rows:
        runs = [r for r in results.get(name, []) if "decode_tok_s" in r]
        if not runs:
            err = (results.get(name) or [{"error": "not run"}])[0].get("error", "")
            print(f"| {name} | failed: {err[:80]} | | | | | |")
            continue
        tps = [r["decode_tok_s"] for r in runs]
        med = statistics.median(tps)
        vs_hf = f"{med / hf:.2f}x" if hf else "-"
        vs_llama = "-"
        if name.endswith("(baseline)"):
            now = median(name.removesuffix(" (baseline)"))
            vs_llama = f"after/before {now / med:.3f}" if now else "-"
        elif engine == "ours" and precision in MATCHING_GGUF:
            ref = median(f"llama.cpp {MATCHING_GGUF[precision].upper()}")
            vs_llama = f"{med / ref:.2f}x" if ref else "not run"
        print(f"| {name} | {med:.1f} [{min(tps):.1f}-{max(tps):.1f}] | {vs_hf} | {vs_llama} | "
              f"{1000 * statistics.median(r['prefill_s'] for r in runs):.0f} | "
              f"{statistics.median(r['peak_rss_mib'] for r in runs):.0f} | "
              f"{statistics.median(r['rss_end_mib'] for r in runs):.0f} |")
    if llama_note:
        print(f"\n{llama_note}")
    for w in ("fp32", "int8", "int4"):
        ls_name = next((r[0] for r in rows if r[0].startswith(f"ours {w} ") and "LS" in r[0]), None)
        if ls_name and median(ls_name) and median(f"ours {w}"):
            overhead = median(f"ours {w}") / median(ls_name) - 1
            print(f"\nlayer sharing ({w}): {ls_preset} decodes {overhead * 100:+.1f}% slower per token than "
                  f"{a.preset} (same weights in memory, twice the logical layers)")
    same = {tuple(r["tokens"]) for n, rs in results.items() for r in rs
            if "tokens" in r and "LS" not in n and ("fp32" in n or "F32" in n)}
    print(f"\nfp32 engines agree on the first 8 greedy tokens: {len(same) == 1}")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(results, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
