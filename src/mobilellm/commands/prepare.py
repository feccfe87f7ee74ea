"""`mobilellm prepare --input ... --tokenizer ... --output DIR`: text to packed token shards + manifest."""

from __future__ import annotations

from mobilellm.data import readers
from mobilellm.data.prepare import (DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, configure_threads, default_workers,
                                    prepare)


def _run(args) -> int:
    configure_threads(args.workers or default_workers())
    prepare(args.input, args.tokenizer, args.output, text_field=args.text_field, val_fraction=args.val_fraction,
            seed=args.seed, workers=args.workers, shard_tokens=args.shard_tokens, txt_mode=args.txt_mode,
            progress=not args.quiet, allow_truncated=args.allow_truncated)
    return 0


def register(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize text into train/val token shards for training",
                       description="Tokenize documents into flat token shards plus manifest.json.")
    p.add_argument("--input", action="append", required=True, metavar="PATH[:WEIGHT]",
                   help="file, folder or glob of .txt/.md/.jsonl/.json/.parquet (text formats optionally .gz/.zst), "
                        "or builtin:pydoc / builtin:stdlib; repeatable; ':WEIGHT' resamples the source "
                        "(2 = every document twice, 0.5 = half of them)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json / tokenizer.model or a directory holding one")
    p.add_argument("--output", required=True, help="output directory (replaced atomically when done)")
    p.add_argument("--text-field", default="text", help="JSON/parquet field holding the text (default: text)")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                   help=f"fraction of documents for validation, by text hash (default: {DEFAULT_VAL_FRACTION})")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and resampling hashes (default: 0)")
    p.add_argument("--workers", type=int, default=0, help="tokenizer threads (default 0: one per core)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard file (default: {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--txt-mode", choices=readers.TXT_MODES, default="file",
                   help="a .txt/.md file is one document (file), one per line, or one per blank-line paragraph")
    p.add_argument("--allow-truncated", action="store_true",
                   help="keep the documents read before the point where a .gz/.zst input is truncated or corrupt "
                        "(default: that is an error)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
