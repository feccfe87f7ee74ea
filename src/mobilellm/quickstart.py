"""`mobilellm quickstart`: raw text to a trained, evaluated, talking layer-shared MobileLLM on a CPU.

No arguments, no data, no network: the corpus is the English documentation that every Python
installation carries (pydoc topics and standard-library docstrings). Steps, each reused when a
previous quickstart in the same folder already finished it:

    tokenizer train -> prepare -> train (mobilellm-mini-ls) -> eval (held-out docs) -> generate
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from mobilellm.errors import MobileLLMError

SOURCES = ["builtin:pydoc", "builtin:stdlib"]
SAMPLE_PROMPT = "The built-in function"


def _say(message: str) -> None:
    print(message, flush=True)


def run(args) -> int:
    import torch

    from mobilellm.data.builtin import builtin_documents
    from mobilellm.data.prepare import prepare
    from mobilellm.tokenizer import load_tokenizer, train_tokenizer
    from mobilellm.train import config as train_config
    from mobilellm.train.trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # 1. tokenizer: a byte-level BPE trained on the built-in corpus
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        tokenizer = load_tokenizer(tok_dir)
        _say(f"[1/5] tokenizer: reusing {tok_dir}")
    else:
        _say(f"[1/5] tokenizer: training a {args.vocab_size}-token byte-level BPE on the built-in corpus")
        docs = [d for name in ("pydoc", "stdlib") for d in builtin_documents(name)]
        tokenizer = train_tokenizer(docs, vocab_size=args.vocab_size)
        tokenizer.save(tok_dir)

    # 2. data: token shards + manifest, 5% of the documents held out
    data_dir = out / "data"
    if (data_dir / "manifest.json").exists():
        _say(f"[2/5] data: reusing {data_dir}")
    else:
        _say("[2/5] data: tokenizing the built-in corpus into shards")
        prepare(SOURCES, tokenizer, data_dir, val_fraction=0.05, workers=0, progress=not args.quiet,
                log=lambda line: _say("      " + line))

    # 3. pretraining: the paper's recipe at CPU scale
    _say(f"[3/5] train: mobilellm-mini-ls ({args.steps} steps, stops early after {args.minutes:g} min)")
    overrides = {
        "model.preset": "mobilellm-mini-ls", "model.overrides.vocab_size": tokenizer.vocab_size,
        "data.train": f"[{data_dir}]", "data.seq_len": 256, "batch.micro_batch": 8,
        "run.max_steps": args.steps, "run.out_dir": str(out / "run"), "run.device": args.device,
        "run.time_limit_minutes": args.minutes, "run.log_every": 10, "run.save_every": 100,
        "run.eval_batches": 50, "schedule.warmup_steps": max(1, args.steps // 20), "optim.lr": 3e-3,
        "run.seed": 0,
    }
    cfg = train_config.load(None, [f"{k}={v}" for k, v in overrides.items()])
    result = train(cfg, resume="auto", progress=not args.quiet)
    if result.stopped_early:
        _say(f"      time limit reached after {result.steps} steps")

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
    _say(f"[5/5] sample: {SAMPLE_PROMPT}{sample}")

    elapsed = time.perf_counter() - started
    _say(f"\ndone in {elapsed / 60:.1f} min. Artifacts:")
    for label, path in (("tokenizer", tok_dir), ("prepared data", data_dir), ("run (config, metrics, checkpoints)",
                        out / "run"), ("model directory", result.final_dir), ("TensorBoard logs", out / "run" /
                        "tensorboard")):
        _say(f"  {label:36s} {path}")
    _say(f"Next: mobilellm generate {result.final_dir} --prompt 'The list type'  |  mobilellm chat {result.final_dir}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("quickstart", help="train, evaluate and sample a small layer-shared model on this CPU",
                       description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    p.add_argument("--steps", type=int, default=240, help="training steps of 8 x 256 tokens (default: 240)")
    p.add_argument("--minutes", type=float, default=6.0, help="training time limit in minutes (default: 6)")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary (default: 4096)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_checked_run)


def _checked_run(args) -> int:
    if args.steps < 1 or args.minutes <= 0 or args.vocab_size < 300:
        raise MobileLLMError("quickstart needs --steps >= 1, --minutes > 0 and --vocab-size >= 300")
    return run(args)
