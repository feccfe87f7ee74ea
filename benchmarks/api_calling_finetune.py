"""API-calling before and after fine-tuning (issue 9): exact match of intent/structure and ROUGE.

    python benchmarks/api_calling_finetune.py --model runs/quickstart/run/final --data runs/api --out runs/api-ft

Generates predictions for the test split with the base model, fine-tunes it with `mobilellm
finetune` (the paper's settings unless overridden; several `--finetune-args` give several
fine-tuned models, each from the same base), predicts again, and scores all of them. Fine-tuning
runs on --device; predictions run on the CPU generation engine. With --predict-only it writes
predictions.json and skips scoring (for machines without rouge-score; score later with
--score-only on that file).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def predictions_for(model_dir: str, rows: list[dict]) -> list[str]:
    from mobilellm.checkpoint import load_model_dir
    from mobilellm.eval.api_calling import predict
    from mobilellm.tokenizer import load_tokenizer

    model = load_model_dir(model_dir)
    return predict(model, load_tokenizer(model_dir), rows, max_new_tokens=48, batch=16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="pretrained model directory")
    p.add_argument("--data", help="folder with train.jsonl / test.jsonl from `mobilellm api-data`")
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--device", default="cpu", help="device for fine-tuning")
    p.add_argument("--finetune-args", nargs="+", default=[""],
                   help="extra arguments for `mobilellm finetune`, one string per fine-tuned model")
    p.add_argument("--predict-only", action="store_true")
    p.add_argument("--score-only", default=None, help="score an existing predictions.json")
    args = p.parse_args()
    out = Path(args.out)
    if args.score_only:
        saved = json.loads(Path(args.score_only).read_text())
    else:
        from mobilellm.eval.api_calling import read_test

        rows = read_test(Path(args.data) / "test.jsonl")[: args.limit]
        saved = {"rows": rows, "models": {"before fine-tuning": predictions_for(args.model, rows)}, "commands": {}}
        for i, extra in enumerate(args.finetune_args):
            run_dir = out / f"run{i}"
            cmd = [sys.executable, "-m", "mobilellm", "finetune", args.model, "--data",
                   str(Path(args.data) / "train.jsonl"), "--out", str(run_dir), "--no-progress",
                   "--run.device", args.device, *extra.split()]
            subprocess.run(cmd, check=True)
            name = f"after fine-tuning ({extra.strip() or 'paper defaults'})"
            saved["models"][name] = predictions_for(str(run_dir / "final"), rows)
            saved["commands"][name] = " ".join(["mobilellm", *cmd[3:]])
        out.mkdir(parents=True, exist_ok=True)
        (out / "predictions.json").write_text(json.dumps(saved, indent=1))
        if args.predict_only:
            return
    from mobilellm.eval.api_calling import score

    print("| model | EM intent | EM structure | ROUGE-1 | ROUGE-L | n |\n|---|---|---|---|---|---|")
    for name, predictions in saved["models"].items():
        m = score(predictions, saved["rows"])
        print(f"| {name} | {m['em_intent']:.1f} | {m['em_structure']:.1f} | {m['rouge1']:.1f} | "
              f"{m['rougeL']:.1f} | {m['n']} |")
    for i, r in enumerate(saved["rows"][:3]):
        print(f"\nrequest: {r['messages'][-2]['content']}\nreference: {r['messages'][-1]['content']!r}")
        for name, predictions in saved["models"].items():
            print(f"{name}: {predictions[i]!r}")


if __name__ == "__main__":
    main()
