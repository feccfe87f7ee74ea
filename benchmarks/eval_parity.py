"""Parity: `mobilellm eval` vs lm-evaluation-harness (`--model hf`) on the same model and the same local files.

Needs lm-eval (the `[eval]` extra) and transformers. Writes lm-eval task YAMLs into a temporary folder
(each `include:`s lm-eval's own task YAML, so the templates are lm-eval's, and points it at a JSONL
converted from our data folder with `dataset_path: json`), runs both evaluators, prints per-task
metrics and differences. WikiText-2 perplexity is compared with the reference method run on the
transformers model (texts joined with "\\n\\n", tokenized once, non-overlapping windows).

  python benchmarks/eval_parity.py --data-dir ../shared/data/eval --limit 300
  python benchmarks/eval_parity.py --model runs/x/model --data-dir ... --limit 0   # all documents

Without --model a small random model with the LLaMA-2 tokenizer is built (layer-shared: ours reads
the shared directory, transformers its unrolled Llama export).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from mobilellm.eval import tasks as T  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LM_EVAL_TASKS = {  # our task -> (lm-eval YAML under lm_eval/tasks, split lm-eval evaluates)
    "arc_easy": ("arc/arc_easy.yaml", "test"),
    "arc_challenge": ("arc/arc_easy.yaml", "test"),
    "boolq": ("super_glue/boolq/default.yaml", "validation"),
    "piqa": ("piqa/piqa.yaml", "validation"),
    "siqa": ("siqa/siqa.yaml", "validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "validation"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "test"),
    "winogrande": ("winogrande/default.yaml", "validation"),
    "lambada": ("lambada/lambada_openai.yaml", "test"),
}


# ---- our files -> the Hugging Face dataset layouts lm-eval's YAMLs read -----------------------------
def to_hf(task: str, doc: dict, i: int) -> dict:
    if task in ("arc_easy", "arc_challenge"):
        return {"id": doc.get("id", str(i)), "question": doc["question"], "choices": doc["choices"],
                "answerKey": doc["answerKey"]}
    if task == "boolq":
        return {"question": doc["question"], "passage": doc["passage"], "idx": i, "label": T._boolq_label(doc)}
    if task == "piqa":
        return {"goal": doc["goal"], "sol1": doc["sol1"], "sol2": doc["sol2"], "label": int(doc["label"])}
    if task == "siqa":
        return {k: doc[k] for k in ("context", "question", "answerA", "answerB", "answerC")} | {
            "label": str(T.siqa_example(doc).gold + 1)}
    if task == "hellaswag":
        return {"ind": i, "ctx": doc["ctx"], **T.hellaswag_doc_fields(doc)}
    if task == "openbookqa":
        q = doc["question"]
        return {"id": doc["id"], "question_stem": q["stem"], "answerKey": doc["answerKey"],
                "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}}
    if task == "winogrande":
        return {k: doc[k] for k in ("sentence", "option1", "option2", "answer")}
    if task == "lambada":
        return {"text": doc["text"] if "text" in doc else doc["context"] + " " + doc["continuation"].strip()}
    raise KeyError(task)


def write_lm_eval_tasks(data_dir: Path, names: list[str], limit: int | None, out: Path) -> dict[str, str]:
    """One YAML + JSONL per task; returns our name -> lm-eval task name."""
    import lm_eval

    lm_tasks = Path(lm_eval.__file__).parent / "tasks"
    mapping = {}
    for name in names:
        yaml_rel, split = LM_EVAL_TASKS[name]
        docs = T.read_jsonl(T.task_file(T.TASKS[name], data_dir), limit)
        jsonl = out / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps(to_hf(name, d, i)) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
        task_name = f"parity_{name}"
        splits = {"training_split": "null", "validation_split": "null", "test_split": "null"}
        splits["test_split" if split == "test" else "validation_split"] = split
        (out / f"{task_name}.yaml").write_text(
            f"include: {lm_tasks / yaml_rel}\n"
            f"task: {task_name}\n"
            "tag: []\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {jsonl}\n"
            + "".join(f"{k}: {v}\n" for k, v in splits.items()),
            encoding="utf-8",
        )
        mapping[name] = task_name
    return mapping


# ---- models -----------------------------------------------------------------------------------------
def build_models(args, work: Path) -> tuple[Path, Path]:
    """(our model dir, plain-Llama dir for transformers). Without --model: a random LS model, LLaMA-2 tokenizer."""
    from mobilellm.checkpoint import has_tokenizer, load_model_dir, save_model_dir
    from mobilellm.config import get_preset
    from mobilellm.model import MobileLLM
    from mobilellm.tokenizer import load_tokenizer

    if args.model:
        ours = Path(args.model)
        if not has_tokenizer(ours):
            sys.exit(f"error: {ours} has no tokenizer files")
        flat = work / "llama"
        save_model_dir(load_model_dir(ours), flat, tokenizer=ours, unroll=True)
        return ours, flat
    tokenizer = load_tokenizer(args.tokenizer)
    torch.manual_seed(0)
    # init_std 0.3: random but peaked next-token distributions, so choices are far from ties
    cfg = get_preset("mobilellm-tiny-ls", vocab_size=tokenizer.vocab_size, max_seq_len=2048, init_std=0.3,
                     dim=128, n_heads=4, n_kv_heads=2, ffn_dim=256)
    model = MobileLLM(cfg).eval()
    ours, flat = work / "mobilellm-ls", work / "llama"
    save_model_dir(model, ours, tokenizer=tokenizer)
    save_model_dir(model, flat, tokenizer=tokenizer, unroll=True)
    return ours, flat


# ---- runs -------------------------------------------------------------------------------------------
def run_lm_eval(model: str, model_args: str, task_names: list[str], include: Path, batch_size: int) -> tuple[dict, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=task_names, batch_size=batch_size,
                                  device="cpu", task_manager=TaskManager(include_path=str(include)),
                                  log_samples=False, bootstrap_iters=0)
    return out["results"], time.perf_counter() - t0


def run_ours(model_dir: Path, names: list[str], data_dir: Path, limit: int | None, batch_size: int) -> tuple[dict, float]:
    from mobilellm.checkpoint import load_model_and_tokenizer
    from mobilellm.eval.evaluator import evaluate

    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(model_dir)
    out = evaluate(model, tokenizer, names, data_dir=data_dir, limit=limit, batch_size=batch_size)
    return out["results"], time.perf_counter() - t0


def reference_wikitext_ppl(flat_dir: Path, data_dir: Path, window: int, max_windows: int | None) -> float:
    """The reference method on the transformers model and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(flat_dir)
    model = AutoModelForCausalLM.from_pretrained(flat_dir, dtype=torch.float32).eval()
    ids = tok(T.read_wikitext(data_dir), return_tensors="pt").input_ids  # (1, N), BOS as the tokenizer adds it
    n = ids.shape[1] // window
    n = min(n, max_windows) if max_windows else n
    nlls = []
    with torch.inference_mode():
        for i in range(n):
            batch = ids[:, i * window:(i + 1) * window]
            nlls.append(model(batch, labels=batch).loss.float() * window)
    return math.exp(torch.stack(nlls).sum().item() / (n * window))


def lm_eval_metrics(res: dict) -> dict:
    out = {}
    for key, value in res.items():
        metric = key.split(",")[0]
        if metric in ("acc", "acc_norm", "perplexity"):
            out["ppl" if metric == "perplexity" else metric] = value
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "eval"))
    p.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "data" / "tokenizers" / "llama2" / "tokenizer.model"))
    p.add_argument("--model", default=None, help="model directory (default: a random LS model, LLaMA-2 tokenizer)")
    p.add_argument("--tasks", default="paper,lambada", help="tasks to compare ('none': only WikiText-2)")
    p.add_argument("--limit", type=int, default=200, help="documents per task (0 = all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads for both evaluators (default: torch's)")
    p.add_argument("--wikitext-windows", type=int, default=0, help="windows for the WikiText-2 check (0 = all, -1 = skip)")
    p.add_argument("--adapter", action="store_true", help="also run lm-eval through our `mobilellm` adapter")
    p.add_argument("--json", default=None, help="write the comparison as JSON here")
    args = p.parse_args()
    limit = args.limit or None
    data_dir = Path(args.data_dir)
    names = [] if args.tasks == "none" else [n for n in T.resolve_task_names(args.tasks) if n in LM_EVAL_TASKS]
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ours_dir, flat_dir = build_models(args, work)
        (work / "tasks").mkdir()
        mapping = write_lm_eval_tasks(data_dir, names, limit, work / "tasks")
        lm_res, lm_s = ({}, 0.0) if not names else run_lm_eval("hf", f"pretrained={flat_dir},dtype=float32", list(mapping.values()),
                                   work / "tasks", args.batch_size)
        our_res, our_s = run_ours(ours_dir, names, data_dir, limit, args.batch_size) if names else ({}, 0.0)
        adapter_res = None
        if args.adapter and names:
            import mobilellm.eval.harness  # noqa: F401  (registers "mobilellm")

            adapter_res, _ = run_lm_eval("mobilellm", f"pretrained={ours_dir}",
                                         list(mapping.values()), work / "tasks", args.batch_size)
        rows, worst = [], 0.0
        print(f"\n| task | metric | n | mobilellm eval | lm-eval hf | diff (points) |" + (" lm-eval mobilellm |" if args.adapter else ""))
        print("|---|---|---|---|---|---|" + ("---|" if args.adapter else ""))
        for name in names:
            theirs = lm_eval_metrics(lm_res[mapping[name]])
            adapter = lm_eval_metrics(adapter_res[mapping[name]]) if adapter_res else {}
            for metric, value in theirs.items():
                mine = our_res[name][metric]
                if metric == "ppl":
                    diff = 100 * (mine / value - 1)  # percent
                    shown = f"{diff:+.4f}%"
                else:
                    diff = 100 * (mine - value)
                    worst = max(worst, abs(diff))
                    shown = f"{diff:+.2f}"
                extra = f" {100 * adapter[metric] if metric != 'ppl' else adapter[metric]:.2f} |" if adapter else ""
                fmt = (lambda v: f"{v:.4f}") if metric == "ppl" else (lambda v: f"{100 * v:.2f}")
                print(f"| {name} | {metric} | {our_res[name]['n']} | {fmt(mine)} | {fmt(value)} | {shown} |{extra}")
                rows.append({"task": name, "metric": metric, "n": our_res[name]["n"], "mobilellm": mine,
                             "lm_eval_hf": value, "lm_eval_mobilellm": adapter.get(metric)})
        print(f"\nlargest accuracy difference: {worst:.2f} points; wall time: ours {our_s:.1f}s, lm-eval hf {lm_s:.1f}s")
        wiki = None
        if args.wikitext_windows >= 0:
            from mobilellm.checkpoint import load_model_and_tokenizer
            from mobilellm.eval.perplexity import windows_perplexity

            model, tokenizer = load_model_and_tokenizer(ours_dir)
            window = model.config.max_seq_len
            ids = tokenizer.encode(T.read_wikitext(data_dir), bos=tokenizer.add_bos)
            max_w = args.wikitext_windows or None
            ours_ppl = windows_perplexity(model, ids, window=window, limit=max_w, batch_size=2)["ppl"]
            ref_ppl = reference_wikitext_ppl(flat_dir, data_dir, window, max_w)
            rel = 100 * (ours_ppl / ref_ppl - 1)
            wiki = {"ours": ours_ppl, "reference": ref_ppl, "relative_diff_percent": rel, "window": window,
                    "windows": max_w or len(ids) // window}
            print(f"wikitext2 ppl ({wiki['windows']} windows of {window}): ours {ours_ppl:.4f}, "
                  f"reference (transformers) {ref_ppl:.4f}, diff {rel:+.5f}%")
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "wikitext2": wiki, "limit": limit,
                                                   "seconds": {"ours": our_s, "lm_eval_hf": lm_s}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
