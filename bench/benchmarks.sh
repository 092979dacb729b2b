#!/usr/bin/env bash
# bench/benchmarks.sh: the real-benchmark results table.
#
# For VQA-RAD (official test, n = 451) and SLAKE (English test, n = 1,061), the full pipeline
# with the tiny from-scratch model on each benchmark's own training split:
#   retrieve.py (BM25 over SLAKE's KG + the demo glossary -> template pseudo-labels)
#   -> sft.py (stage 1) -> grpo.py (stage 2, short) -> evaluate.py (after SFT and after GRPO,
#   with the majority and question-only baselines beside).
# Every hyperparameter is on the command line (the scripts' defaults are tuned for the demo).
# CPU, ~25 min on 2 shared cores. Each command and its wall time go to runs/bench/log.jsonl; the
# table is printed, and written to PREFIX.json and PREFIX.md only with --out PREFIX.
#
#   bash bench/benchmarks.sh                         # DATA=$MEDFACT_DATA_DIR, else ../shared/data
#   bash bench/benchmarks.sh --out bench/results/benchmarks   # the committed table
#   DATA=path/to/data SFT_STEPS=150 GRPO_STEPS=35 bash bench/benchmarks.sh
#   DATASETS= bash bench/benchmarks.sh --out ...     # no runs: the table from runs/bench only
# DATA holds vqa_rad/ (the OSF release: "VQA_RAD Dataset Public.json" + images) and
# slake/Slake1.0/ (train/validate/test.json, imgs/, KG/); see ../shared/data/*/SOURCE.txt.
set -euo pipefail
usage() {
  echo "usage: bash bench/benchmarks.sh [-h] [--out PREFIX]   (settings: DATA OUT SFT_STEPS GRPO_STEPS DATASETS PY)"
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}
TABLE=
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --out) [ $# -ge 2 ] || { echo "--out needs a PREFIX" >&2; exit 2; }; TABLE=$2; shift 2 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-${MEDFACT_DATA_DIR:-../shared/data}}
OUT=${OUT:-runs/bench}
SFT_STEPS=${SFT_STEPS:-150}
GRPO_STEPS=${GRPO_STEPS:-35}
DATASETS=${DATASETS-"vqa_rad slake"}   # a subset reruns only those; DATASETS= (empty): the table only
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # torch threads thrash on a small shared CPU
mkdir -p "$OUT"

run() {  # run NAME CMD...: run one command, log it and its wall time
  local name=$1; shift
  echo "+ $*" >&2
  local t0; t0=$(date +%s.%N)
  "$@"
  local t1; t1=$(date +%s.%N)
  "$PY" - "$OUT/log.jsonl" "$name" "$t0" "$t1" "$@" <<'EOF'
import json, shlex, sys
log, name, t0, t1, *cmd = sys.argv[1:]
with open(log, "a") as f:
    f.write(json.dumps({"name": name, "command": shlex.join(cmd), "seconds": round(float(t1) - float(t0), 1)}) + "\n")
EOF
}

for ds in $DATASETS; do
  if [ "$ds" = vqa_rad ]; then SRC=$DATA/vqa_rad; else SRC=$DATA/slake/Slake1.0; fi
  D=$OUT/$ds
  rm -rf "$D"; mkdir -p "$D"
  # 1. pseudo-labels for the training split: BM25 top-3 over SLAKE's KG and the glossary
  run "$ds/retrieve" "$PY" retrieve.py --data "$SRC" --split train --lang en \
    --corpus "$DATA/slake/Slake1.0/KG" --corpus demo --retriever bm25 --k 3 --coverage 1.0 --seed 0 \
    --writer template --chunk 64 --out "$D/pseudo.jsonl"
  # 2. stage 1: SFT of the tiny model (its tokenizer is trained on these pseudo-labels)
  run "$ds/sft" "$PY" sft.py --data "$D/pseudo.jsonl" --model tiny --out "$D/sft" \
    --max_steps "$SFT_STEPS" --batch_size 32 --grad_accum 1 --lr 2e-3 --min_lr_frac 0.1 --warmup 15 \
    --weight_decay 0.01 --grad_clip 1.0 --val_frac 0.05 --seed 0 --log_every 10 --eval_every 50 \
    --save_every 0 --max_bad_steps 3
  # 3. stage 2: a short GRPO run from the SFT model, the four rewards with equal weights
  run "$ds/grpo" "$PY" grpo.py --ckpt "$D/sft" --data "$D/pseudo.jsonl" --split train --val_split test \
    --eval_every 0 --max_steps "$GRPO_STEPS" --out "$D/grpo" --prompts_per_step 16 --group_size 6 \
    --temperature 1.0 --max_new_tokens 96 --dynamic_sampling 0 --w_accuracy 1 --w_format 1 --w_fact 1 \
    --w_consistency 1 --lr 1e-4 --warmup 5 --weight_decay 0.0 --kl_coef 0.04 --clip_eps 0.2 \
    --inner_epochs 1 --micro_batch 48 --grad_clip 1.0 --seed 0 --save_every 0 --rollouts_per_step 2 \
    --max_bad_steps 3
  # 4. greedy evaluation on the official test split, after each stage, baselines beside
  for stage in sft grpo; do
    run "$ds/eval_$stage" "$PY" evaluate.py --ckpt "$D/$stage" --data "$SRC" --split test --lang en \
      --max_new_tokens 128 --batch_size 64 --out "$D/eval_$stage/metrics.json"
  done
done

# the table
"$PY" - "$OUT" "$TABLE" <<'EOF'
import json, os, sys
out, table = sys.argv[1], sys.argv[2]
log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
last = {r["name"]: r for r in log}  # the latest run of each command
names = {"vqa_rad": "VQA-RAD (official test)", "slake": "SLAKE (English test)"}
import platform, torch
res = {"model": "tiny (~2M params, from scratch, its BPE tokenizer trained on the pseudo-labels)",
       "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                  f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
       "commands": list(last.values()), "results": []}
for ds in ("vqa_rad", "slake"):
    for stage in ("sft", "grpo"):
        m = json.load(open(os.path.join(out, ds, f"eval_{stage}", "metrics.json")))
        res["results"].append({**m, "dataset": ds, "stage": stage,
                               "train_seconds": last[f"{ds}/{stage}"]["seconds"]})
f = lambda x: "-" if x is None else f"{x:.3f}"
lines = ["| dataset | stage | n | accuracy | closed | open | open recall | format | fact | consistency "
         "| majority | question-only |", "|" + " --- |" * 12]
for r in res["results"]:
    b = r.get("baselines") or {}
    lines.append(f"| {names[r['dataset']]} | {r['stage']} | {r['n']} | " + " | ".join(f(r[k]) for k in (
        "accuracy", "closed_accuracy", "open_accuracy", "open_recall", "format", "fact", "consistency"))
        + f" | {f(b.get('majority'))} | {f(b.get('question_only'))} |")
lines += ["", "n: VQA-RAD's official test (test_freeform + test_para), SLAKE's English test. Baselines from the "
          "same dataset's training split (VQA-RAD: the 1,797 rows of the public JSON; SLAKE: 4,918 English rows): "
          "majority = the most frequent training answer per answer type; question-only = the most frequent "
          "training answer for the same question string. fact is '-': the test rows carry no keywords (only "
          "retrieve.py's training pseudo-labels do). The model is the ~2M-parameter tiny model trained from "
          f"scratch on a CPU ({res['machine']}), 112x112 images; not comparable with the paper's pretrained "
          "Qwen2.5-VL-3B.", "", "| step | seconds | command |", "| --- | --- | --- |"]
lines += [f"| {r['name']} | {r['seconds']:.0f} | `{r['command']}` |" for r in res["commands"]]
print("\n".join(lines))
if table:
    os.makedirs(os.path.dirname(os.path.abspath(table)), exist_ok=True)
    json.dump(res, open(table + ".json", "w"), indent=1)
    open(table + ".md", "w").write("\n".join(lines) + "\n")
    print(f"wrote {table}.json and .md")
EOF
