"""Decode latency of every variant of a study on this CPU, for the quality-against-cost plot.

Latency depends on the shape, not on the trained weights, so each variant's shape is rebuilt from
its results.json record with seeded random weights and decoded by the native engine (fp32 and
int8, 2 threads by default): a 16-token prompt, then 128 new tokens, median of `--repeats` runs.
The result is written to <study>/latency.json; rerun `mobilellm study <spec> --merge ...` (or the
study itself) and its table gains decode_ms_fp32 / decode_ms_int8 columns and pareto.png.

    python benchmarks/study_latency.py results/study-2026-12-02-gpu/merged/long_depth_vs_width
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def decode_ms(config, precision: str, threads: int, new_tokens: int, repeats: int) -> float:
    import torch

    from mobilellm.inference import Engine, SamplingParams
    from mobilellm.model import MobileLLM

    torch.manual_seed(0)
    engine = Engine(MobileLLM(config).eval(), precision=precision, threads=threads, max_len=16 + new_tokens)
    prompt = [(7 * i + 3) % config.vocab_size for i in range(16)]
    engine.generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
    times = []
    for _ in range(repeats):
        request = engine.submit(engine.make_request(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)))
        engine.step()  # prefill + first token: not decode
        start = time.perf_counter()
        while engine.has_work():
            engine.step()
        times.append((time.perf_counter() - start) / (len(request.output_ids) - 1))
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("study", nargs="+", help="study output folders (each with results.json)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precisions", nargs="+", default=["fp32", "int8"])
    args = p.parse_args()

    import os

    from mobilellm.config import ModelConfig
    from mobilellm.fileio import write_json_atomic
    from mobilellm.sysinfo import hardware

    for folder in map(Path, args.study):
        records = json.loads((folder / "results.json").read_text())["runs"]
        out, seen = {}, {}
        for r in records:
            if r["variant"] in out:
                continue
            cfg_path = folder / "runs" / r["run"] / "config.yaml"
            shape = (r["dim"], r["layers"], r["logical_layers"], r["heads"], r["kv_heads"], r["ffn"], r["sharing"])
            if shape in seen:  # the same shape under another name (a shared baseline)
                out[r["variant"]] = out[seen[shape]]
                continue
            import yaml

            model = yaml.safe_load(cfg_path.read_text())["resolved"]["model"] if cfg_path.exists() else None
            if model is None:
                raise SystemExit(f"{cfg_path} not found: run the latency benchmark on a folder with runs/*/config.yaml")
            config = ModelConfig.from_dict(model)
            out[r["variant"]] = {f"decode_ms_{prec}": round(decode_ms(config, prec, args.threads, args.new_tokens,
                                                                      args.repeats), 3)
                                 for prec in args.precisions}
            seen[shape] = r["variant"]
            print(f"{folder.name}: {r['variant']}: " + ", ".join(f"{k} {v}" for k, v in out[r["variant"]].items()),
                  flush=True)
        out["_measured"] = {"hardware": hardware(), "threads": args.threads, "new_tokens": args.new_tokens,
                            "load_average": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d")}
        write_json_atomic(folder / "latency.json", out)
        print(f"wrote {folder / 'latency.json'}")


if __name__ == "__main__":
    main()
