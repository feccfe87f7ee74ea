"""`mobilellm api-data --out DIR`: the synthetic API-calling dataset (train/test JSONL) for fine-tuning."""

from __future__ import annotations


def run(args) -> int:
    from mobilellm.eval.api_calling import write_splits

    train_path, test_path = write_splits(args.out, args.train, args.test, args.seed)
    print(f"wrote {args.train} training and {args.test} test conversations: {train_path}, {test_path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("api-data", help="generate the synthetic API-calling dataset (train/test JSONL)",
                       description="Conversations where the assistant answers with one API call, then a reply; "
                                   "deterministic from --seed; `mobilellm eval --tasks api_calling` scores them.")
    p.add_argument("--out", required=True, help="output folder for train.jsonl and test.jsonl")
    p.add_argument("--train", type=int, default=5000)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
