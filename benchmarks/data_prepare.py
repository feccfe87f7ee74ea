"""Throughput of `mobilellm prepare` against the raw tokenizer batch rate, same text, same machine, same run.

  baseline   `tokenizers.Tokenizer.encode_batch` (all cores, its own thread pool) on the documents already
             in memory; for SentencePiece `sp.encode(texts, num_threads=cores)`.
  prepare    `mobilellm.data.prepare.prepare()` (the function behind `mobilellm prepare`, called as the
             CLI calls it): reading and decompressing the .jsonl.zst shards, JSON parsing, split hashing,
             tokenizing, writing shards and manifest, with N tokenizer threads (`--workers N`).

Besides tokens/s (wall clock), the table shows tokens per CPU-second, which is what the machine's
other load disturbs least.

Run:  .venv/bin/python benchmarks/data_prepare.py [--shards 1] [--workers 1,2] [--max-docs N] [--repeat 3]
Prints a markdown table; `--append` adds it to benchmarks/RESULTS.md with date, commit and CPU.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mobilellm.data.prepare import default_workers
from mobilellm.fileio import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def read_texts(files: list[Path], max_docs: int | None) -> list[str]:
    import zstandard

    texts = []
    for f in files:
        with open(f, "rb") as fh:
            reader = io.BufferedReader(zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(fh))
            for line in reader:
                texts.append(json.loads(line)["text"])
                if max_docs and len(texts) >= max_docs:
                    return texts
    return texts


def baseline(tokenizer_path: Path, texts: list[str], cores: int, fast: bool = False) -> tuple[int, float, float]:
    """(tokens, wall seconds, CPU seconds) of the raw library batch call, 32 documents per call.

    fast=True: `encode_batch_fast` (no character offsets), the call prepare makes; tokenizer.json only.
    """
    if tokenizer_path.suffix == ".model":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))

        def encode(batch):
            return sum(map(len, sp.encode(batch, num_threads=cores)))
    else:
        from tokenizers import Tokenizer

        tk = Tokenizer.from_file(str(tokenizer_path))

        call = tk.encode_batch_fast if fast else tk.encode_batch

        def encode(batch):
            return sum(map(len, call(batch)))  # len(Encoding): no id list is built

    wall, cpu, n = time.perf_counter(), time.process_time(), 0  # process_time includes the library's threads
    for i in range(0, len(texts), 32):
        n += encode(texts[i:i + 32])
    return n, time.perf_counter() - wall, time.process_time() - cpu


def run_prepare(tokenizer_path: Path, inputs: list[str], workers: int) -> tuple[int, float, float]:
    """(text tokens, wall seconds, CPU seconds) of prepare() in a fresh interpreter.

    Wall time is measured inside, around the prepare() call (no interpreter start-up); CPU time is that
    of the interpreter and its worker processes. Text tokens exclude the BOS/EOS prepare adds per
    document, to compare with the baseline's count.
    """
    with tempfile.TemporaryDirectory() as tmp:
        code = (
            "import json, time\n"
            "from mobilellm.data.prepare import configure_threads, prepare\n"
            "if __name__ == '__main__':\n"
            f"    configure_threads({workers})\n"
            "    t = time.perf_counter()\n"
            f"    m = prepare({inputs!r}, {str(tokenizer_path)!r}, {str(Path(tmp) / 'out')!r}, workers={workers}, "
            "progress=False, log=lambda s: None)\n"
            "    dt = time.perf_counter() - t\n"
            "    tokens = sum(s['tokens'] for s in m['splits'].values())\n"
            "    docs = sum(s['documents'] for s in m['splits'].values())\n"
            "    print(json.dumps([tokens - docs * (1 + m['tokenizer']['add_bos']), dt]))\n"
        )
        script = Path(tmp) / "run_prepare.py"
        script.write_text(code)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        text_tokens, seconds = json.loads(out.strip().splitlines()[-1])
        return text_tokens, seconds, cpu


def subset(files: list[Path], max_docs: int, directory: Path) -> list[str]:
    """The first max_docs books, written as one .jsonl.zst like the originals."""
    import zstandard

    sub = directory / "subset.jsonl.zst"
    data = "".join(json.dumps({"text": t}) + "\n" for t in read_texts(files, max_docs)).encode()
    sub.write_bytes(zstandard.ZstdCompressor(level=3).compress(data))
    return [str(sub)]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=1, help="Gutenberg train shards to use (1-8, ~69 MB text each)")
    ap.add_argument("--max-docs", type=int, default=None, help="only the first N books (quick runs)")
    ap.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "smollm2" / "tokenizer.json"))
    ap.add_argument("--sentencepiece", default=str(SHARED / "tokenizers" / "llama2" / "tokenizer.model"),
                    help="also measure this tokenizer.model ('' to skip)")
    ap.add_argument("--workers", default="1,2", help="prepare thread counts to measure")
    ap.add_argument("--sp-workers", default=str(default_workers()), help="worker counts for the SentencePiece runs")
    ap.add_argument("--repeat", type=int, default=1, help="repetitions (interleaved; medians reported)")
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()

    corpus = SHARED / "corpus" / "gutenberg_top100"
    files = [corpus / f"train-{i:02d}.jsonl.zst" for i in range(args.shards)]
    missing = [f for f in files if not f.is_file()]
    if missing:
        sys.exit(f"missing {missing[0]}: this benchmark needs ../shared/data beside the repository")
    cores = len(os.sched_getaffinity(0))
    texts = read_texts(files, args.max_docs)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    tokenizers = [Path(args.tokenizer)] + ([Path(args.sentencepiece)] if args.sentencepiece else [])
    worker_counts = [int(w) for w in args.workers.split(",")]
    sp_worker_counts = [int(w) for w in args.sp_workers.split(",")]

    tmp = tempfile.TemporaryDirectory()
    inputs = subset(files, args.max_docs, Path(tmp.name)) if args.max_docs else [str(f) for f in files]
    load = os.getloadavg()[0]

    # Repetitions interleave baseline and prepare runs, so slow drifts in machine load hit both alike;
    # the table shows medians, the ratio is the median of per-repetition ratios.
    results: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for rep in range(args.repeat):
        for tok in tokenizers:
            name = f"{tok.parent.name}/{tok.name}"
            base = baseline(tok, texts, cores)
            results.setdefault((name, f"raw batch encode, {cores} threads"), []).append(base)
            print(f"[{rep}] {name}: baseline {base[0] / base[1]:,.0f} tok/s", file=sys.stderr)
            if tok.suffix == ".json":
                fast = baseline(tok, texts, cores, fast=True)
                results.setdefault((name, f"raw encode_batch_fast, {cores} threads"), []).append(fast)
            for w in worker_counts if tok == tokenizers[0] else sp_worker_counts:
                label = f"prepare --workers {w}"
                run = run_prepare(tok, inputs, w)
                results.setdefault((name, label), []).append(run)
                print(f"[{rep}] {name}: {label} {run[0] / run[1]:,.0f} tok/s", file=sys.stderr)
    tmp.cleanup()

    table = [
        f"Input: {len(files)} Gutenberg shard(s){f', first {args.max_docs} books' if args.max_docs else ''}: "
        f"{len(texts)} documents, {mb:.1f} MB of text. {args.repeat} repetition(s), medians shown. "
        f"Load average (1 min) at start: {load:.1f}.",
        "",
        "| tokenizer | run | text tokens | wall s | tokens/s | vs raw (wall) | CPU s | tokens/CPU-s | vs raw (CPU) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rates: dict[tuple[str, str], float] = {}
    for (name, label), runs in results.items():
        base_runs = results[(name, f"raw batch encode, {cores} threads")]
        tokens = runs[0][0]
        wall = statistics.median(r[1] for r in runs)
        cpu = statistics.median(r[2] for r in runs)
        ratio_wall = statistics.median((r[0] / r[1]) / (b[0] / b[1]) for r, b in zip(runs, base_runs))
        ratio_cpu = statistics.median((r[0] / r[2]) / (b[0] / b[2]) for r, b in zip(runs, base_runs))
        rates[(name, label)] = tokens / wall
        table.append(f"| {name} | {label} | {tokens:,} | {wall:.1f} | {tokens / wall:,.0f} | {ratio_wall:.2f}x | "
                     f"{cpu:.1f} | {tokens / cpu:,.0f} | {ratio_cpu:.2f}x |")
    for name in dict.fromkeys(n for n, _ in results):
        one, two = rates.get((name, "prepare --workers 1")), rates.get((name, "prepare --workers 2"))
        fast = rates.get((name, f"raw encode_batch_fast, {cores} threads"))
        if two and fast:
            table.append(f"\n{name}: prepare --workers 2 / raw encode_batch_fast = {two / fast:.2f}x (wall tokens/s).")
        if one and two:
            table.append(f"\nScaling {name}: 2 workers / 1 worker = {two / one:.2f}x (wall tokens/s).")
    text = "\n".join(table)
    print(text)
    if args.append:
        results_md = REPO / "benchmarks" / "RESULTS.md"
        date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=REPO).stdout.strip()
        old = results_md.read_text(encoding="utf-8") if results_md.exists() else "# Benchmark results\n"
        section = (f"\n## Data preparation throughput (benchmarks/data_prepare.py)\n\n"
                   f"Date: {date}. Commit: {commit} (plus uncommitted work). Hardware: {cpu_model()}, "
                   f"{cores} cores.\n\n{text}\n")
        write_text_atomic(results_md, old + section)


if __name__ == "__main__":
    main()
