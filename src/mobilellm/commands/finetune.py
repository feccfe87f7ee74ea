"""`mobilellm finetune <model dir> --data train.jsonl`: supervised fine-tuning with the trainer.

Defaults follow the paper's fine-tuning (docs/paper.md); the trainer, checkpoints, `--resume auto`,
torchrun and `--section.key value` overrides are those of pretraining."""

from __future__ import annotations

import math
from pathlib import Path

from mobilellm.commands.options import parse_overrides, print_training_summary
from mobilellm.errors import MobileLLMError


def build_data(args, cfg, model_cfg, env):
    """Tokenize, mask and pack the fine-tuning set (and the validation set, if any)."""
    from mobilellm.chat_template import DEFAULT_CHAT_TEMPLATE
    from mobilellm.checkpoint import has_tokenizer
    from mobilellm.finetune import data as sft
    from mobilellm.tokenizer import load_tokenizer
    from mobilellm.train.trainer import TrainData

    if not has_tokenizer(args.model):
        raise MobileLLMError(f"{args.model} has no tokenizer files: fine-tuning needs the model's tokenizer")
    tokenizer = load_tokenizer(args.model)
    if tokenizer.chat_template is None:  # stored with the fine-tuned model, so chat/serve use the same format
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    seq_len, pad = cfg.data.seq_len, tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def load(path, name):
        conversations, skipped = sft.read_examples(path)
        examples = [sft.tokenize_conversation(c, tokenizer) for c in conversations]
        examples, fitted = sft.fit_to_context(examples, seq_len, args.overflow)
        if not examples:
            raise MobileLLMError(f"{path}: no example has assistant tokens within {seq_len} tokens")
        rows = sft.pack(examples, seq_len, pad, packing=not args.no_packing)
        if env.is_main:
            notes = ", ".join(f"{v} {k}" for k, v in {**skipped, **fitted}.items())
            print(f"{name}: {len(examples)} examples in {len(rows)} rows of {seq_len} tokens"
                  + (f" ({notes})" if notes else ""))
        return rows

    rows = load(args.data, "fine-tuning data")
    val_rows = load(args.val_data, "validation data") if args.val_data else None
    stream = sft.SFTStream(rows, cfg.batch.micro_batch, env.rank, env.world_size, cfg.run.seed)
    val = (lambda: sft.validation_batches(val_rows, cfg.batch.micro_batch, env.rank, env.world_size)) if val_rows else None
    return TrainData(stream=stream, val_batches=val, tokenizer=tokenizer,
                     steps_per_epoch=math.ceil(len(rows) / stream.global_batch))


def run(args) -> int:
    from mobilellm.train import config as train_config
    from mobilellm.train.trainer import train

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise MobileLLMError(f"{model_dir} is not a model directory (no config.json)")
    out = args.out or f"runs/finetune-{model_dir.resolve().name}"
    if args.seq_len is None:
        from mobilellm.checkpoint import load_config

        args.seq_len = min(1024, load_config(model_dir).max_seq_len)
    defaults = {
        "model.preset": "none", "model.init_from": str(model_dir), "data.train": f"[{args.data}]",
        "data.seq_len": args.seq_len, "batch.micro_batch": args.micro_batch, "optim.lr": args.lr,
        "optim.weight_decay": 0.01, "schedule.kind": "linear", "schedule.warmup_steps": 0,
        "schedule.min_lr_ratio": 0.0, "run.epochs": args.epochs, "run.out_dir": out, "run.log_every": 10,
        "run.eval_batches": 1,
    }
    if args.distill_cache and not args.teacher:
        raise MobileLLMError("--distill-cache caches a teacher's logits: give --teacher too")
    if args.teacher:
        defaults.update({"distill.teacher": args.teacher, "distill.alpha": args.distill_alpha,
                         "distill.temperature": args.distill_temperature,
                         "distill.cache_top_k": args.distill_cache_top_k})
    if args.distill_cache:
        defaults["distill.cache_dir"] = args.distill_cache
    items = [f"{k}={v}" for k, v in defaults.items()] + parse_overrides(getattr(args, "overrides", []))
    cfg = train_config.load(None, items)
    result = train(cfg, resume=args.resume, progress=not args.no_progress,
                   data_fn=lambda c, m, e: build_data(args, c, m, e), overwrite=args.overwrite)
    print_training_summary(result, f"fine-tuned {result.steps} steps")
    return 0


def register(sub) -> None:
    p = sub.add_parser("finetune", help="supervised fine-tuning (chat, API calling), optional distillation",
                       description=__doc__.split("\n")[0])
    p.add_argument("model", help="model directory to start from (with its tokenizer)")
    p.add_argument("--data", required=True, help="JSONL of {messages: [...]} or {prompt, completion}")
    p.add_argument("--val-data", default=None, help="validation JSONL in the same format")
    p.add_argument("--out", default=None, help="run directory (default: runs/finetune-<model>)")
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seq-len", type=int, default=None, help="row length (default: the model's context, at most 1024)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--no-packing", action="store_true", help="one example per row instead of packing")
    p.add_argument("--overflow", choices=["truncate", "drop"], default="truncate",
                   help="examples longer than the context are truncated (default) or dropped; both are counted")
    p.add_argument("--teacher", default=None, help="distill from this model directory (same vocabulary)")
    p.add_argument("--distill-alpha", type=float, default=0.5)
    p.add_argument("--distill-temperature", type=float, default=2.0)
    p.add_argument("--distill-cache", default=None, metavar="DIR",
                   help="cache the teacher's logits in DIR: the teacher runs once per row, not once per epoch")
    p.add_argument("--distill-cache-top-k", type=int, default=0, metavar="K",
                   help="cache only the teacher's K largest logits per position (default 0: all of them)")
    p.add_argument("--resume", default="auto", help="auto (newest checkpoint of --out, default), a checkpoint dir, "
                                                    "or none")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out folder that holds another run, deleting its checkpoints")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run, accepts_overrides=True)
