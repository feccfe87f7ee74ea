"""`mobilellm bench <model dir | .pte | .gguf | .onnx>`: on-device style latency on this CPU.

The MobileLLM paper's on-device latency table as a command: load time, first-token time (prefill of the
prompt plus the first greedy token: the paper's "init"), per-token decode time, peak resident memory
and file size. Each runtime runs in a fresh subprocess so that load time and peak RSS are its own:

  model directory  PyTorch eager through the generation engine (mobilellm.inference.Engine, torch backend)
  .pte             ExecuTorch's Python runtime (XNNPACK delegate)
  .gguf            llama.cpp through llama-cpp-python (f16 KV cache, its default)
  .onnx            ONNX Runtime, CPU execution provider

Prompts are fixed pseudo-random token ids (no tokenizer needed); decoding is greedy and never stops
early, so every runtime does the same amount of work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mobilellm.errors import MobileLLMError
from mobilellm.sysinfo import peak_rss_bytes

RUNTIMES = {".pte": "executorch", ".gguf": "llama.cpp", ".onnx": "onnxruntime"}


def runtime_for(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir():
        return "pytorch"
    if not p.exists():
        raise MobileLLMError(f"{p} does not exist: give a model directory or a .pte/.gguf/.onnx file")
    if p.suffix not in RUNTIMES:
        raise MobileLLMError(f"{p}: unknown artifact type {p.suffix!r}; expected a model directory, .pte, .gguf or .onnx")
    return RUNTIMES[p.suffix]


def artifact_bytes(path: str | Path) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.iterdir() if f.name.startswith(("model", "pytorch_model")))
    return p.stat().st_size


def prompt_ids(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    import random

    rng = random.Random(seed)
    low = min(3, vocab_size - 1)  # skip the usual special ids (pad/bos/eos)
    return [rng.randrange(low, vocab_size) for _ in range(n)]


# ---- one runtime, in this process --------------------------------------------------------------


def _greedy(step, prompt: list[int], new_tokens: int) -> tuple[float, list[float], list[int]]:
    """step(tokens, start) -> last-position logits (anything with argmax). Returns (first, decode times, ids)."""
    t0 = time.perf_counter()
    nxt = int(step(prompt, 0).argmax())
    first = time.perf_counter() - t0
    out, times, pos = [nxt], [], len(prompt)
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        nxt = int(step([nxt], pos).argmax())
        times.append(time.perf_counter() - t0)
        out.append(nxt)
        pos += 1
    return first, times, out


def measure(path: str, runtime: str, threads: int, n_prompt: int, n_new: int) -> dict:
    """Runs in the worker subprocess."""
    rss_before = peak_rss_bytes()
    t0 = time.perf_counter()
    if runtime == "pytorch":
        import torch

        from mobilellm.checkpoint import load_model_dir
        from mobilellm.inference import Engine, SamplingParams

        torch.set_num_threads(threads)
        model = load_model_dir(path)
        vocab = model.config.vocab_size
        engine = Engine(model, None, max_batch=1, max_len=n_prompt + n_new, threads=threads,
                        backend="torch")  # this row is PyTorch; decode_cpu.py measures the native backend
        load = time.perf_counter() - t0
        req = engine.make_request(prompt_ids(n_prompt, vocab), SamplingParams(max_new_tokens=n_new, ignore_eos=True))
        engine.submit(req)
        marks = []
        with torch.inference_mode():
            while engine.has_work():
                s = time.perf_counter()
                engine.step()
                marks.append(time.perf_counter() - s)
        first, times, out = marks[0], marks[1:], req.output_ids
    elif runtime == "executorch":
        from mobilellm.export.executorch import PteRunner

        runner = PteRunner(path, threads=threads)
        load = time.perf_counter() - t0
        vocab = int(runner.forward([0], 0).shape[-1])  # one warm call also sizes the vocabulary
        first, times, out = _greedy(lambda toks, start: runner.forward(toks, start)[-1],
                                    prompt_ids(n_prompt, vocab), n_new)
    elif runtime == "llama.cpp":
        import numpy as np
        from llama_cpp import Llama

        llm = Llama(model_path=path, n_ctx=n_prompt + n_new + 1, n_threads=threads, n_threads_batch=threads,
                    n_batch=max(n_prompt, 1), verbose=False)
        load = time.perf_counter() - t0
        vocab = llm.n_vocab()

        def step(toks, start):
            llm.eval(toks)  # appends at position llm.n_tokens == start
            # only the last position's logits are computed (logits_all=False); read them from the context
            return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))

        first, times, out = _greedy(step, prompt_ids(n_prompt, vocab), n_new)
        llm.close()
    elif runtime == "onnxruntime":
        from mobilellm.export.onnx import OnnxRunner

        runner = OnnxRunner(path, threads=threads)
        load = time.perf_counter() - t0
        vocab = next((o.shape[-1] for o in runner.session.get_outputs() if o.name == "logits"), None)
        first, times, out = _greedy(lambda toks, start: runner.forward(toks)[-1], prompt_ids(n_prompt, int(vocab)), n_new)
    else:
        raise MobileLLMError(f"unknown runtime {runtime!r}")
    decode_ms = 1000 * sum(times) / max(len(times), 1)
    return {
        "runtime": runtime, "path": str(path), "threads": threads, "prompt_tokens": n_prompt, "new_tokens": n_new,
        "load_ms": 1000 * load, "first_token_ms": 1000 * first, "decode_ms_per_token": decode_ms,
        "decode_tokens_per_s": 1000 / decode_ms if decode_ms else None,
        "peak_rss_mib": peak_rss_bytes() / 2**20, "rss_before_load_mib": rss_before / 2**20,
        "file_mib": artifact_bytes(path) / 2**20, "output_ids": out,
    }


def _worker(argv: list[str]) -> None:
    path, runtime, threads, n_prompt, n_new = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    print("BENCH " + json.dumps(measure(path, runtime, threads, n_prompt, n_new)), flush=True)


def bench(path: str | Path, *, threads: int = 2, prompt_tokens: int = 64, new_tokens: int = 64,
          python: str | None = None, timeout: float = 1800) -> dict:
    """Measure one artifact in a fresh subprocess (honest load time and peak RSS)."""
    runtime = runtime_for(path)
    if prompt_tokens < 1 or new_tokens < 2:
        raise MobileLLMError("--prompt-tokens must be >= 1 and --new-tokens >= 2")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    cmd = [python or sys.executable, "-c", "import sys; from mobilellm.bench import _worker; _worker(sys.argv[1:])",
           str(path), runtime, str(threads), str(prompt_tokens), str(new_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[len("BENCH "):])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    if "No module named" in tail:
        tail += " (install the export extra: pip install 'mobilellm[export]')"
    raise MobileLLMError(f"{runtime} benchmark of {path} failed: {tail}")


COLUMNS = [("runtime", "runtime", "{}"), ("file_mib", "file MiB", "{:.1f}"), ("load_ms", "load ms", "{:.1f}"),
           ("first_token_ms", "first token ms", "{:.1f}"), ("decode_ms_per_token", "decode ms/token", "{:.2f}"),
           ("decode_tokens_per_s", "tok/s", "{:.1f}"), ("peak_rss_mib", "peak RSS MiB", "{:.0f}")]


def table(rows: list[dict], label_key: str | None = None) -> str:
    cols = ([(label_key, label_key, "{}")] if label_key else []) + COLUMNS
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in cols) + " |")
    return "\n".join(lines)
