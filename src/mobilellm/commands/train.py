"""`mobilellm train --config run.yaml [--section.key value ...] [--resume auto]`."""

from __future__ import annotations

from mobilellm.commands.options import parse_overrides, print_training_summary
from mobilellm.errors import MobileLLMError
from mobilellm.train.config import load


def run(args) -> int:
    from mobilellm.train.trainer import train

    overrides = parse_overrides(getattr(args, "overrides", []))
    if args.config is None and not overrides:
        raise MobileLLMError("no training config: pass --config FILE (a YAML file such as configs/cpu-tiny.yaml) and "
                             "the data prepared by `mobilellm prepare`, e.g. mobilellm train --config "
                             "configs/cpu-tiny.yaml --data.train '[runs/data]' (docs/training.md; "
                             "`mobilellm quickstart` does every step for you)")
    cfg = load(args.config, overrides)
    result = train(cfg, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    print_training_summary(result, f"trained {result.steps} steps, {result.tokens:,} tokens in {result.elapsed_s:.0f}s")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="pretrain a model (one CPU, one GPU, or torchrun DDP/FSDP2)",
                       description="Train from a YAML config; override any key with --section.key value "
                                   "(sections: model, data, batch, optim, schedule, run).")
    p.add_argument("--config", help="YAML training config (see configs/)")
    p.add_argument("--resume", default="auto",
                   help="auto (newest checkpoint of run.out_dir, default), a checkpoint dir, or none")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh (or from the --resume checkpoint) in a run.out_dir that holds another run, "
                        "deleting its checkpoints and final model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run, accepts_overrides=True)
