"""`mobilellm study <spec.yaml> [...]`: train and evaluate model variants under one recipe, then compare.

Every variant is trained with the same data, tokens, schedule and seed, evaluated and tabulated under
<out>/ (runs/<variant>/, results.{md,csv,json}, plots); finished variants are not redone. Several specs
in one command share identical prepare sections and identical runs; `--jobs N` trains N runs at a time
in worker processes. docs/study.md describes the spec and the output layout."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mobilellm import study_curve
from mobilellm.errors import MobileLLMError
from mobilellm.fileio import atomic_path, write_json_atomic, write_text_atomic
from mobilellm.sysinfo import hardware

ZERO_SHOT = ("arc_easy", "arc_challenge", "boolq", "piqa", "siqa", "hellaswag", "openbookqa", "winogrande")


@dataclass
class Variant:
    name: str
    model: dict  # {preset: ..., overrides: {...}}
    train: dict = field(default_factory=dict)  # extra "section.key: value" overrides for this variant
    seeds: list = field(default_factory=lambda: [None])  # None: the recipe's seed
    budget_exempt: bool = False  # e.g. an untied-embedding variant that adds parameters on purpose

    def runs(self) -> list[tuple[str, int | None]]:
        if self.seeds == [None]:
            return [(self.name, None)]
        return [(f"{self.name}@seed{s}", s) for s in self.seeds]


@dataclass
class StudySpec:
    name: str
    variants: list[Variant]
    train: dict  # {section: {key: value}} shared by every variant
    data: str | None = None  # an already prepared data folder
    prepare: dict | None = None  # {inputs: [...], tokenizer: path, val_fraction: ..., text_field: ...}
    eval: dict = field(default_factory=lambda: {"tasks": ["val"]})
    param_budget: dict | None = None  # {target: int, tolerance: 0.1}
    description: str = ""
    curve: dict | None = None  # {tokens: [...], samples: N}: annealed points below the full run (study_curve)
    compare: list = field(default_factory=list)  # [{name, a, b}]: a's loss minus b's at every curve point


_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand(value):
    """`${VAR}` / `${VAR:-default}` in every string of the spec (data folders differ per machine)."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: os.environ.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, list):
        return [expand(v) for v in value]
    if isinstance(value, dict):
        return {k: expand(v) for k, v in value.items()}
    return value


def load_spec(path: str | Path) -> StudySpec:
    p = Path(path)
    if not p.is_file():
        raise MobileLLMError(f"study spec {p} not found")
    try:
        raw = expand(yaml.safe_load(p.read_text(encoding="utf-8")) or {})
    except yaml.YAMLError as err:
        raise MobileLLMError(f"study spec {p} is not valid YAML ({str(err).splitlines()[0]})") from None
    known = {"name", "description", "variants", "train", "data", "prepare", "eval", "param_budget", "curve",
             "compare"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise MobileLLMError(f"study spec {p}: unknown keys {unknown}; known keys are {sorted(known)}")
    if not raw.get("variants"):
        raise MobileLLMError(f"study spec {p} lists no variants")
    if bool(raw.get("data")) == bool(raw.get("prepare")):
        raise MobileLLMError(f"study spec {p}: give exactly one of `data` (a prepared folder) or `prepare`")
    variants = []
    for item in raw["variants"]:
        if not isinstance(item, dict) or "name" not in item or "model" not in item:
            raise MobileLLMError(f"study spec {p}: every variant needs a name and a model section, got {item!r}")
        extra = sorted(set(item) - {"name", "model", "train", "seeds", "budget_exempt"})
        if extra:
            raise MobileLLMError(f"study spec {p}: variant {item['name']!r} has unknown keys {extra}")
        variants.append(Variant(name=str(item["name"]), model=item["model"], train=item.get("train") or {},
                                seeds=item.get("seeds") or [None], budget_exempt=bool(item.get("budget_exempt"))))
    evaluation = raw.get("eval") or {"tasks": ["val"]}
    unknown = sorted(set(evaluation) - {"tasks", "data_dir", "limit", "batch_size"})
    if unknown:
        raise MobileLLMError(f"study spec {p}: unknown eval keys {unknown}; known: batch_size, data_dir, limit, tasks")
    _eval_groups(evaluation)
    names = [n for v in variants for n, _ in v.runs()]
    if len(set(names)) != len(names):
        raise MobileLLMError(f"study spec {p}: variant names must be unique")
    curve = raw.get("curve")
    if curve is not None and (not isinstance(curve, dict) or set(curve) - {"tokens", "samples"}
                              or not isinstance(curve.get("tokens", []), list)):
        raise MobileLLMError(f"study spec {p}: curve takes tokens (a list of token counts) and samples")
    compare = raw.get("compare") or []
    for item in compare:
        if not isinstance(item, dict) or set(item) != {"name", "a", "b"}:
            raise MobileLLMError(f"study spec {p}: every compare entry needs exactly name, a and b, got {item!r}")
        missing = {item["a"], item["b"]} - {v.name for v in variants}
        if missing:
            raise MobileLLMError(f"study spec {p}: compare {item['name']!r} names unknown variants {sorted(missing)}")
    return StudySpec(name=str(raw.get("name") or p.stem), description=raw.get("description", ""),
                     variants=variants, train=raw.get("train") or {}, data=raw.get("data"),
                     prepare=raw.get("prepare"), eval=evaluation,
                     param_budget=raw.get("param_budget"), curve=curve, compare=compare)


def _overrides(sections: dict) -> list[str]:
    out = []
    for section, values in sections.items():
        if not isinstance(values, dict):
            raise MobileLLMError(f"study spec: train.{section} must be a mapping")
        for key, value in values.items():
            if isinstance(value, (list, dict)):
                value = json.dumps(value)
            out.append(f"{section}.{key}={value}")
    return out


def variant_config(spec: StudySpec, variant: Variant, seed: int | None, data_dir: Path, run_dir: Path):
    from mobilellm.train import config as train_config

    items = _overrides(spec.train) + _overrides(variant.train)
    model = dict(variant.model)
    items.append(f"model.preset={model.pop('preset', None)}")
    for key, value in (model.pop("overrides", None) or {}).items():
        items.append(f"model.overrides.{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}")
    if model:
        raise MobileLLMError(f"variant {variant.name!r}: model takes preset and overrides, got {sorted(model)}")
    items += [f"data.train=[{data_dir}]", f"run.out_dir={run_dir}"]
    if seed is not None:
        items.append(f"run.seed={seed}")
    cfg = train_config.load(None, items)
    cfg.validate()
    if spec.curve:  # the main run keeps a checkpoint where each decay branch starts
        cfg.run.keep_steps = [b.start_step for b in study_curve.plan_branches(cfg, spec.curve.get("tokens", []))]
    return cfg


def check_budget(spec: StudySpec, configs: dict) -> None:
    """configs: run name -> (variant, TrainConfig)."""
    if not spec.param_budget:
        return
    target = float(spec.param_budget["target"])
    tolerance = float(spec.param_budget.get("tolerance", 0.1))
    for variant, cfg in configs.values():
        n = cfg.model_config().num_params()
        if not variant.budget_exempt and abs(n - target) > tolerance * target:
            raise MobileLLMError(f"variant {variant.name!r} has {n:,} parameters, outside the budget "
                                 f"{target:,.0f} +/- {tolerance:.0%}; change its shape or mark it budget_exempt")


def prepare_data(spec: StudySpec, data_dir: Path) -> None:
    """Run the spec's `prepare` section into data_dir (plan() chooses the folder)."""
    from mobilellm.data.prepare import prepare

    p = dict(spec.prepare)
    inputs, tokenizer = p.pop("inputs", None), p.pop("tokenizer", None)
    if not inputs or not tokenizer:
        raise MobileLLMError("study spec: prepare needs inputs and tokenizer")
    prepare(inputs, tokenizer, data_dir, **p)


def _eval_groups(ev: dict) -> list[tuple[list[str], int | None]]:
    """Tasks grouped by document limit: `limit` is one number for every task or {task: n}."""
    tasks = list(ev.get("tasks", ["val"]))
    limit = ev.get("limit")
    if not isinstance(limit, dict):
        return [(tasks, limit)]
    unknown = sorted(set(limit) - set(tasks))
    if unknown:
        raise MobileLLMError(f"study spec: eval.limit names tasks that eval.tasks does not list: {unknown}")
    groups: dict = {}
    for task in tasks:
        groups.setdefault(limit.get(task), []).append(task)
    return [(names, lim) for lim, names in groups.items()]


def run_variant(spec: StudySpec, variant: Variant, run_name: str, cfg, data_dir: Path, progress: bool = True) -> dict:
    """Train (or resume) and evaluate one run; reuse both when already done."""
    from mobilellm.checkpoint import load_model_dir
    from mobilellm.eval.evaluator import code_version, evaluate
    from mobilellm.tokenizer import load_tokenizer
    from mobilellm.train.trainer import train

    run_dir = Path(cfg.run.out_dir)
    done = run_dir / "eval.json"
    if done.exists():
        return json.loads(done.read_text())
    print(f"study: {run_name}: training", flush=True)
    started = time.perf_counter()
    result = train(cfg, resume="auto", progress=progress)
    train_s = time.perf_counter() - started
    import torch

    use_cuda = cfg.run.device in ("auto", "cuda") and torch.cuda.is_available()
    device = "cuda" if use_cuda else "cpu"
    curve = []
    if spec.curve:
        samples = int(spec.curve.get("samples", 200))
        branches = study_curve.plan_branches(cfg, spec.curve.get("tokens", []))
        curve = study_curve.run_branches(cfg, branches, data_dir, samples, device)
        curve.append({"tokens": result.tokens, "steps": result.steps,
                      **study_curve.score_dir(result.final_dir, data_dir, cfg.data.seq_len, samples, device)})
    model = load_model_dir(result.final_dir, device=device)
    ev = spec.eval
    started, results = time.perf_counter(), {}
    for tasks, limit in _eval_groups(ev):
        report = evaluate(model, load_tokenizer(result.final_dir), tasks, data_dir=ev.get("data_dir"),
                          manifest=data_dir, seq_len=cfg.data.seq_len, limit=limit,
                          batch_size=ev.get("batch_size", 32), progress=progress)
        results.update(report["results"])
    mc = model.config
    record = {
        "run": run_name, "variant": variant.name, "seed": cfg.run.seed, "params": mc.num_params(),
        "non_embedding_params": mc.num_params() - mc.vocab_size * mc.dim * (1 if mc.tie_embeddings else 2),
        "dim": mc.dim, "layers": mc.n_layers, "logical_layers": mc.n_logical_layers, "heads": mc.n_heads,
        "kv_heads": mc.n_kv_heads, "ffn": mc.ffn_dim, "ffn_type": mc.ffn_type, "tied": mc.tie_embeddings,
        "sharing": mc.layer_sharing if mc.layer_sharing == "none" else f"{mc.layer_sharing}x{mc.share_repeats}",
        "steps": result.steps, "tokens": result.tokens, "train_seconds": round(train_s, 1),
        "eval_seconds": round(time.perf_counter() - started, 1),
        "final_train_loss": result.losses[-1][1] if result.losses else None,
        "results": {task: results[task] for task in ev.get("tasks", ["val"])}, "curve": curve,
        "hardware": hardware(), "code_version": code_version(),
    }
    write_json_atomic(done, record)
    return record


def headline(results: dict) -> dict:
    """One number per task: val/wikitext2 perplexity, lambada and zero-shot accuracy (%)."""
    row = {}
    for task, res in results.items():
        if task == "val":
            row["val_loss"] = res.get("loss")
            row["val_ppl"] = res.get("ppl")
        elif task == "wikitext2":
            row["wikitext2_ppl"] = res.get("ppl")
        elif task == "lambada":
            row["lambada_acc"] = 100 * res["acc"]
            row["lambada_ppl"] = res.get("ppl")
        elif task in ZERO_SHOT:
            row[task] = 100 * res.get("acc_norm", res["acc"])
    zs = [row[t] for t in ZERO_SHOT if t in row]
    if zs:
        row["zero_shot_avg"] = sum(zs) / len(zs)
    return row


def table_rows(records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        row = {k: r.get(k) for k in ("run", "params", "non_embedding_params", "dim", "layers", "logical_layers",
                                     "heads", "kv_heads", "ffn", "ffn_type", "tied", "sharing", "tokens",
                                     "train_seconds", "final_train_loss")}
        row.update(headline(r["results"]))
        if r.get("curve"):
            final = r["curve"][-1]
            row.update(val_bpb=final["val_bpb"], train_split_loss=final["train_loss"], gap=final["gap"])
        # joined by benchmarks/study_latency.py
        row.update({key: r[key] for key in ("decode_ms_fp32", "decode_ms_int8") if key in r})
        rows.append(row)
    return rows


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def write_tables(rows: list[dict], out: Path, spec: StudySpec, gap_rows: list[dict] = ()) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = [f"# Study: {spec.name}", "", spec.description.strip(), "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    for g in gap_rows:
        if g["points"]:
            lines += ["", f"{g['name']} ({g['a']} minus {g['b']}, held-out loss, nats; below zero: {g['a']} wins): "
                      + ", ".join(f"{t / 1e6:g}M: {d:+.3f}" for t, d in g["points"])]
    markdown = "\n".join(lines) + "\n"
    write_text_atomic(out / "results.md", markdown)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "results.csv", buf.getvalue())
    return markdown


def _train_curve(run_dir: Path) -> tuple[list, list]:
    """(tokens, training loss) from a run's metrics.jsonl; empty when it has none."""
    metrics = run_dir / "metrics.jsonl"
    points = {}
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec:
                points[rec["tokens"]] = rec["loss"]
    return list(points), list(points.values())


def mean_curves(records: list[dict]) -> dict:
    """variant -> {tokens: (mean held-out loss over its seeds, spread max-min, n seeds)}."""
    by_variant: dict = {}
    for r in records:
        for point in r.get("curve") or []:
            by_variant.setdefault(r["variant"], {}).setdefault(point["tokens"], []).append(point["val_loss"])
    return {v: {t: (sum(ls) / len(ls), max(ls) - min(ls), len(ls)) for t, ls in sorted(pts.items())}
            for v, pts in by_variant.items()}


def gaps(spec: StudySpec, records: list[dict]) -> list[dict]:
    """For every `compare` entry: a's mean held-out loss minus b's at the token counts both have."""
    curves, out = mean_curves(records), []
    for item in spec.compare:
        a, b = curves.get(item["a"], {}), curves.get(item["b"], {})
        out.append({"name": item["name"], "a": item["a"], "b": item["b"],
                    "points": [(t, a[t][0] - b[t][0]) for t in sorted(set(a) & set(b))]})
    return out


def write_plots(records: list[dict], rows: list[dict], out: Path, gap_rows: list[dict] = ()) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, ax, name, legend=True):
        if legend:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(out / name)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in records:
        tokens, loss = _train_curve(out / "runs" / r["run"])
        if tokens:
            ax.plot(tokens, loss, label=r["run"], linewidth=1.2)
    ax.set(xlabel="training tokens", ylabel="training loss", title="Loss curves")
    save(fig, ax, "loss_curves.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    scored = [r for r in rows if r.get("val_loss") is not None]
    ax.scatter([r["logical_layers"] for r in scored], [r["val_loss"] for r in scored])
    for r in scored:
        ax.annotate(r["run"], (r["logical_layers"], r["val_loss"]), fontsize=7)
    ax.set(xlabel="logical layers (depth)", ylabel="validation loss", title="Final validation loss vs depth")
    save(fig, ax, "loss_vs_depth.png", legend=False)

    curves = mean_curves(records)
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for variant, points in curves.items():
            tokens = list(points)
            ax.errorbar(tokens, [points[t][0] for t in tokens], yerr=[points[t][1] / 2 for t in tokens],
                        marker="o", label=variant, linewidth=1.2, capsize=2)
        ax.set(xscale="log", xlabel="training tokens (each point an annealed model)", ylabel="held-out loss",
               title="Held-out loss vs tokens (mean over seeds; bars: seed range)")
        save(fig, ax, "loss_vs_tokens.png")
    found = [g for g in gap_rows if g["points"]]
    if found:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for g in found:
            ax.plot([t for t, _ in g["points"]], [d for _, d in g["points"]], marker="o", label=g["name"])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set(xscale="log", xlabel="training tokens", ylabel="held-out loss difference (nats)",
               title="Gaps (below zero: the first variant wins)")
        save(fig, ax, "gaps.png")
    timed = [r for r in rows if r.get("decode_ms_fp32") is not None and r.get("val_loss") is not None]
    if timed:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, marker in (("decode_ms_fp32", "o"), ("decode_ms_int8", "s")):
            pts = [r for r in timed if r.get(key) is not None]
            ax.scatter([r[key] for r in pts], [r["val_loss"] for r in pts], marker=marker,
                       label=key.replace("decode_ms_", ""))
            for r in pts:
                ax.annotate(r["run"], (r[key], r["val_loss"]), fontsize=6)
        ax.set(xlabel="decode ms/token (2-core CPU, native engine)", ylabel="held-out loss",
               title="Quality against measured latency")
        save(fig, ax, "pareto.png")

    metric = "zero_shot_avg" if any("zero_shot_avg" in r for r in rows) else (
        "lambada_acc" if any("lambada_acc" in r for r in rows) else "val_ppl")
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r.get(metric) is not None:
            ax.scatter(r["params"] / 1e6, r[metric])
            ax.annotate(r["run"], (r["params"] / 1e6, r[metric]), fontsize=7)
    ax.set(xlabel="parameters (M)", ylabel=metric.replace("_", " "), title=f"{metric} vs parameters")
    save(fig, ax, "accuracy_vs_params.png", legend=False)
    return paths


@dataclass
class Job:
    spec_path: Path
    spec: StudySpec
    out: Path  # the spec's output folder
    variant: Variant
    run_name: str
    cfg: object  # TrainConfig
    data_dir: Path

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.out_dir)

    def key(self) -> str:
        """Runs with equal keys train the same model on the same data and evaluate it the same way."""
        train = self.cfg.to_dict()
        train["run"].pop("out_dir")
        blob = json.dumps({"train": train, "data": str(self.data_dir.resolve()), "eval": self.spec.eval},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def spec_outputs(spec_paths: list[Path], out: str | Path | None) -> list[tuple[Path, StudySpec, Path]]:
    """(spec file, spec, output folder): one spec writes to --out itself, several to --out/<name>."""
    specs = [(Path(p), load_spec(p)) for p in spec_paths]
    names = [s.name for _, s in specs]
    if len(set(names)) != len(names):
        raise MobileLLMError(f"study specs must have different names, got {names}")
    if len(specs) == 1:
        return [(specs[0][0], specs[0][1], Path(out or Path("runs") / "study" / specs[0][1].name))]
    root = Path(out or Path("runs") / "study")
    return [(p, s, root / s.name) for p, s in specs]


def plan(spec_paths: list, out=None, only: list[str] | None = None) -> list[Job]:
    """Every run of every spec, configs validated and budgets checked before anything trains."""
    jobs, prepared = [], {}
    for spec_path, spec, spec_out in spec_outputs(spec_paths, out):
        spec_out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(spec_out / "spec.yaml", spec_path.read_text(encoding="utf-8"))
        key = json.dumps(spec.prepare, sort_keys=True) if spec.prepare else None
        if key is not None and key in prepared:
            data_dir = prepared[key]  # the same data another spec of this command prepares
        else:
            data_dir = Path(spec.data) if spec.data else spec_out / "data"
            prepared[key] = data_dir
        configs = {}
        for variant in spec.variants:
            for run_name, seed in variant.runs():
                if only and variant.name not in only and run_name not in only:
                    continue
                cfg = variant_config(spec, variant, seed, data_dir, spec_out / "runs" / run_name)
                configs[run_name] = variant, cfg
                jobs.append(Job(spec_path, spec, spec_out, variant, run_name, cfg, data_dir))
        check_budget(spec, configs)
    if not jobs:
        raise MobileLLMError(f"--only {only} matches no variant of the given specs")
    return jobs


def prepare_all(jobs: list[Job]) -> None:
    for job in {j.data_dir: j for j in jobs}.values():
        if job.spec.prepare and not (job.data_dir / "manifest.json").exists():
            prepare_data(job.spec, job.data_dir)


def copy_results(source: Job, target: Job) -> None:
    """A duplicate run: the same results under the other spec's name, and a note where they came from."""
    record = json.loads((source.run_dir / "eval.json").read_text())
    record.update(run=target.run_name, variant=target.variant.name, same_as=str(source.run_dir))
    target.run_dir.mkdir(parents=True, exist_ok=True)
    metrics = source.run_dir / "metrics.jsonl"
    if metrics.exists():
        shutil.copyfile(metrics, target.run_dir / "metrics.jsonl")
    write_json_atomic(target.run_dir / "eval.json", record)
    print(f"study: {target.run_name} ({target.spec.name}): same run as {source.run_dir}, results copied")


def run_in_workers(jobs: list[Job], n_jobs: int) -> None:
    """Train and evaluate `jobs` in up to n_jobs worker processes; each logs to <run>/study.log."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    pending, running, failed = list(jobs), {}, []
    free_slots = list(range(n_jobs))
    while pending or running:
        while pending and free_slots:
            job, slot = pending.pop(0), free_slots.pop(0)
            job.run_dir.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if gpus > 1:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            cmd = [sys.executable, "-m", "mobilellm", "study", str(job.spec_path), "--out", str(job.out),
                   "--worker", job.run_name, "--data-dir", str(job.data_dir)]
            log = open(job.run_dir / "study.log", "a", encoding="utf-8")
            running[subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)] = (job, slot, log,
                                                                                            time.perf_counter())
            print(f"study: {job.run_name} ({job.spec.name}): started (worker {slot})", flush=True)
        time.sleep(1)
        for proc in [p for p in running if p.poll() is not None]:
            job, slot, log, t0 = running.pop(proc)
            log.close()
            free_slots.append(slot)
            if proc.returncode == 0 and (job.run_dir / "eval.json").exists():
                print(f"study: {job.run_name} ({job.spec.name}): done in {time.perf_counter() - t0:.0f} s", flush=True)
            else:
                tail = (job.run_dir / "study.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
                print(f"study: {job.run_name} ({job.spec.name}): FAILED (exit {proc.returncode}): {tail[0]}",
                      flush=True)
                failed.append(job)
    if failed:
        names = ", ".join(f"{j.spec.name}/{j.run_name}" for j in failed)
        raise MobileLLMError(f"{len(failed)} run(s) failed: {names}; see study.log in their run folders "
                             "(finished runs are kept; rerun the same command to retry)")


def report(spec: StudySpec, out: Path, jobs: list[Job]) -> dict:
    missing = [j.run_name for j in jobs if not (j.run_dir / "eval.json").exists()]
    if missing:
        print(f"study: {spec.name}: not in the table (no results yet): {', '.join(missing)}")
    records = [json.loads((j.run_dir / "eval.json").read_text()) for j in jobs if j.run_name not in missing]
    latency = out / "latency.json"  # written by benchmarks/study_latency.py: {variant: {decode_ms_fp32: ...}}
    if latency.exists():
        measured = json.loads(latency.read_text())
        for r in records:
            r.update(measured.get(r["variant"], {}))
    rows = table_rows(records)
    gap_rows = gaps(spec, records)
    write_json_atomic(out / "results.json", {"study": spec.name, "runs": records, "gaps": gap_rows})
    markdown = write_tables(rows, out, spec, gap_rows)
    plots = write_plots(records, rows, out, gap_rows)
    return {"out": out, "markdown": markdown, "plots": plots, "records": records}


MERGED_FILES = ("eval.json", "metrics.jsonl", "config.yaml", "study.log")


def merge_runs(planned: list[Job], sources: list) -> int:
    """Copy finished runs' results (never weights) from other study output folders into this one.

    A source is a spec's output folder or the parent of several (what `--out` got on another machine,
    job or worker). Returns how many runs were copied; runs already here are kept.
    """
    sources = [Path(s) for s in sources]
    for source in sources:
        if not source.is_dir():
            raise MobileLLMError(f"--merge {source}: no such folder")
    copied = 0
    for job in planned:
        if (job.run_dir / "eval.json").exists():
            continue
        for source in sources:
            found = next((c for c in (source / "runs" / job.run_name, source / job.spec.name / "runs" / job.run_name)
                          if (c / "eval.json").is_file()), None)
            if found is None:
                continue
            for path in [found / n for n in MERGED_FILES] + sorted(found.glob("branches/*/*")):
                if path.is_file() and path.name in MERGED_FILES + ("point.json",):
                    target = job.run_dir / path.relative_to(found)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(target) as tmp:
                        shutil.copyfile(path, tmp)
            copied += 1
            break
    return copied


def run_study(spec_paths, out: str | Path | None = None, only: list[str] | None = None, jobs: int = 1,
              merge: list | None = None) -> list[dict]:
    """Plan, prepare, train/evaluate (skipping finished and duplicate runs), then tabulate each spec:
    one {out, markdown, plots, records} per spec (just one for a single spec path). `merge`: result
    folders of other jobs to combine instead of training (see merge_runs)."""
    if isinstance(spec_paths, (str, Path)):
        return run_study([spec_paths], out, only, jobs, merge)[0]
    if not isinstance(jobs, int) or jobs < 1:
        raise MobileLLMError(f"--jobs must be a positive integer, got {jobs!r}")
    planned = plan(spec_paths, out, only)
    if merge:
        print(f"study: merged {merge_runs(planned, merge)} run(s) from {len(merge)} folder(s)")
        return _report_all(planned)
    prepare_all(planned)
    first: dict[str, Job] = {}
    duplicates = []
    for job in planned:
        if job.key() in first:
            duplicates.append((first[job.key()], job))
        else:
            first[job.key()] = job
    todo = []
    for job in first.values():
        if (job.run_dir / "eval.json").exists():
            print(f"study: {job.run_name}: done, reusing {job.run_dir}")
        else:
            todo.append(job)
    if jobs == 1:
        for job in todo:
            run_variant(job.spec, job.variant, job.run_name, job.cfg, job.data_dir)
    else:
        run_in_workers(todo, jobs)
    for source, target in duplicates:
        if not (target.run_dir / "eval.json").exists():
            copy_results(source, target)
    return _report_all(planned)


def _report_all(planned: list[Job]) -> list[dict]:
    """report() for each spec's output folder, in plan order."""
    groups: dict[Path, list[Job]] = {}
    for job in planned:
        groups.setdefault(job.out, []).append(job)
    return [report(jobs[0].spec, spec_out, jobs) for spec_out, jobs in groups.items()]


def run_one(spec_path: str | Path, run_name: str, data_dir: str | Path, out: str | Path) -> None:
    """One run of one spec, inside a worker process started by run_in_workers."""
    spec = load_spec(spec_path)
    for variant in spec.variants:
        for name, seed in variant.runs():
            if name == run_name:
                cfg = variant_config(spec, variant, seed, Path(data_dir), Path(out) / "runs" / name)
                run_variant(spec, variant, name, cfg, Path(data_dir), progress=False)
                return
    raise MobileLLMError(f"spec {spec_path} has no run {run_name!r}")
