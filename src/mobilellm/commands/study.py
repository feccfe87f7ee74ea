"""`mobilellm study`: train and compare model variants at a matched budget (paper ablations)."""

from __future__ import annotations

import argparse

from mobilellm import study


def run(args) -> int:
    if args.worker:
        study.run_one(args.spec[0], args.worker, args.data_dir, args.out)
        return 0
    results = study.run_study(args.spec, args.out, args.only.split(",") if args.only else None, jobs=args.jobs,
                              merge=args.merge)
    for result in results:
        print(result["markdown"])
        print(f"results: {result['out']}/results.md, .csv, .json; plots: "
              + ", ".join(p.name for p in result["plots"]))
    return 0


def register(sub) -> None:
    p = sub.add_parser("study", help="train and compare model variants at a matched budget (paper ablations)",
                       description=(study.__doc__ or "").split("\n")[0])
    p.add_argument("spec", nargs="+", help="study spec YAML(s) (see configs/studies/)")
    p.add_argument("--out", default=None,
                   help="output folder (default: runs/study/<name>; with several specs, their parent folder)")
    p.add_argument("--only", default=None, help="comma-separated variant or run names to run")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time, in worker processes")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="combine the results of other jobs' --out folders into one table and plots (no training)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)
