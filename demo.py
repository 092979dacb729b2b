"""
demo.py: the whole MEDFACT-R1 pipeline on the embedded demo, offline, on a laptop CPU.

    data -> retrieve.py (pseudo-labels) -> sft.py -> grpo.py -> evaluate.py (base, SFT, SFT + GRPO)

Each stage runs as the same command a user would type (printed before it runs), writes into
--out, and is skipped on a re-run when its output is complete (--fresh starts over). At the end
it prints one table and writes report.json ({"base", "sft", "grpo": evaluate.py's JSON,
"seconds": {stage: s}}) and curves.png (reward parts and held-out accuracy over GRPO steps;
needs matplotlib, otherwise it says how to get the picture).

    python demo.py                        # = make demo
    python demo.py --ablation             # = make ablation: the paper's ablation on the demo
    python demo.py --plot runs/demo       # only redraw curves.png

The tiny model starts from random weights (the paper's starts from a pretrained Qwen2.5-VL) and
the whole job must fit in ~15 minutes on a 2-core CPU: 600 SFT steps (--sft_steps) take ~4 min and
60 GRPO steps (96 prompts x 6 samples each) ~3.5 min. The SFT budget is small on purpose (700 steps
reach ~0.95 alone, and the GRPO of then added nothing to that). See the README for the measured table, the time of
each stage, the seeds, and how the GRPO setting was chosen (on the val split).
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
parser.add_argument("--out", default="runs/demo", help="folder for every stage's output and report.json")
parser.add_argument("--fresh", action="store_true", help="start over instead of reusing finished stages")
parser.add_argument("--ablation", action="store_true", help="run the ablation table instead of the main job")
parser.add_argument("--plot", default=None, help="only draw curves.png for this demo folder")
parser.add_argument("--main", default="runs/demo", help="ablation: the main job's folder (reused when finished)")
parser.add_argument("--sft_steps", type=int, default=600, help="SFT steps of 32 pseudo-labels (~4 min on 2 cores)")
parser.add_argument("--grpo_steps", type=int, default=60, help="GRPO steps of 96 prompts x 6 samples (~3.5 min)")
parser.add_argument("--coverage", type=float, default=1.0, help="share of pseudo-labels that cite evidence")
parser.add_argument("--seed", type=int, default=0, help="passed to retrieve.py, sft.py and grpo.py")

PY = sys.executable
KEYS = ["accuracy", "closed_accuracy", "open_accuracy", "open_recall", "format", "fact", "consistency"]


# At most two torch threads per stage: on an idle 2-core CPU two threads ran SFT and GRPO steps
# 1.5x faster than one; more buy little for a model this small. On a machine busy with other
# jobs, threads thrash (5-10x slower in our runs): set OMP_NUM_THREADS=1 there.
os.environ.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))


def run(cmd, done_file, seconds, name, fresh):
    """Run a stage unless its output exists; time it. A subprocess, as a user would run it: what the demo
    shows is what the command lines do, and each stage starts with a clean process (threads, memory)."""
    if done_file and os.path.exists(done_file) and not fresh:
        print(f"[{name}] reusing {done_file}")
        return
    print(f"\n[{name}] $ {' '.join(cmd)}", flush=True)
    t = time.time()
    subprocess.run(cmd, check=True)
    seconds[name] = round(time.time() - t, 1)


def evaluate_ckpt(ckpt, out, name, seconds, fresh, extra=()):
    """evaluate.py on the demo's test split (a stage like the others); its metrics JSON."""
    path = os.path.join(out, "metrics.json")
    run([PY, "evaluate.py", "--ckpt", ckpt, "--data", "demo", "--split", "test", "--out", path, "--quiet",
         *extra], path, seconds, name, fresh)
    with open(path) as f:
        return json.load(f)


def table(results, title):
    """One row per model, the metrics of evaluate.py's table."""
    print(f"\n{title}")
    print(f"{'':>26} | " + " | ".join(f"{k:>15}" for k in KEYS))
    for name, res in results.items():
        print(f"{name:>26} | " + " | ".join(f"{res[k]:15.3f}" if res[k] is not None else f"{'-':>15}"
                                            for k in KEYS))


def paired(before_dir, after_dir):
    """Same questions, two models: how many answers the second fixed and broke, and the exact two-sided
    McNemar p-value (a sign test on the flips): is the change bigger than chance?"""
    # matched by row id, not by line: the two files need not list the rows in the same order
    read = lambda d: {r["id"]: r["exact"] for r in map(json.loads, open(os.path.join(d, "predictions.jsonl")))}
    a, b = read(before_dir), read(after_dir)
    fixed = sum(1 for k in a if not a[k] and b.get(k))
    broke = sum(1 for k in a if a[k] and not b.get(k))
    n = fixed + broke
    # under "no change", each flip is a fixed or a broken answer with probability 1/2: a binomial tail, doubled
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(fixed, broke) + 1)) / 2 ** n) if n else 1.0
    return {"fixed": fixed, "broke": broke, "p_value": round(p, 4)}


def pval(p):
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def plot(folder):
    """curves.png from grpo/metrics.jsonl: the reward parts per step, and the held-out accuracy."""
    metrics = os.path.join(folder, "grpo", "metrics.jsonl")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"curves.png needs matplotlib: pip install matplotlib && {PY} demo.py --plot {folder}")
        return
    recs = [json.loads(line) for line in open(metrics)]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in recs]
    for k in ("reward_accuracy", "reward_format", "reward_fact", "reward_consistency"):
        ax[0].plot(steps, [r[k] for r in recs], label=k.replace("reward_", ""))
    ax[0].set(title="GRPO rewards (training rollouts)", xlabel="step", ylim=(0, 1.05))
    ax[0].legend()
    val = [(r["step"], r["val_accuracy"]) for r in recs if "val_accuracy" in r]
    ax[1].plot(*zip(*val), marker="o") if val else None
    ax[1].set(title="held-out accuracy (greedy, val split)", xlabel="step")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "curves.png"), dpi=100)
    print(f"wrote {os.path.join(folder, 'curves.png')}")


def main(args):
    out, fresh, seconds = args.out, args.fresh, {}
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "report.json")):  # a re-run keeps the times of the stages it reuses
        seconds = json.load(open(os.path.join(out, "report.json"))).get("seconds", {})
    t0 = time.time()

    # data: drawn in memory from a seed; print what a model that ignores the image would score
    import data
    from evaluate import baselines  # the same baselines evaluate.py reports beside the model
    train, test = data.load("demo", "train"), data.load("demo", "test")
    print(f"demo data: {len(train)} train / {len(test)} test questions; question-only baseline on test: "
          f"{baselines(train, test)['question_only']:.3f}")

    pseudo = os.path.join(out, "pseudo.jsonl")
    sft_dir, grpo_dir = os.path.join(out, "sft"), os.path.join(out, "grpo")
    sft_done = os.path.join(sft_dir, "state.json")  # retrieve.py resumes by itself; once SFT read them, they are done
    run([PY, "retrieve.py", "--data", "demo", "--split", "train", "--out", pseudo, "--coverage", str(args.coverage),
         "--seed", str(args.seed)], pseudo if os.path.exists(sft_done) else None, seconds, "retrieve", fresh)
    run([PY, "sft.py", "--data", pseudo, "--model", "tiny", "--out", sft_dir, "--max_steps", str(args.sft_steps),
         "--seed", str(args.seed)], sft_done, seconds, "sft", fresh)
    run([PY, "grpo.py", "--ckpt", sft_dir, "--data", "demo", "--out", grpo_dir, "--max_steps",
         str(args.grpo_steps), "--seed", str(args.seed)], os.path.join(grpo_dir, "state.json"), seconds, "grpo",
        fresh)
    results = {"base": evaluate_ckpt("tiny", os.path.join(out, "eval_base"), "eval_base", seconds, fresh),
               "sft": evaluate_ckpt(sft_dir, os.path.join(out, "eval_sft"), "eval_sft", seconds, fresh),
               "grpo": evaluate_ckpt(grpo_dir, os.path.join(out, "eval_grpo"), "eval_grpo", seconds, fresh)}
    change = paired(os.path.join(out, "eval_sft"), os.path.join(out, "eval_grpo"))
    report = {**results, "grpo_vs_sft": change, "seconds": seconds, "total_seconds": round(sum(seconds.values()), 1)}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(out)
    b = results["grpo"].get("baselines", {})
    table({"base (untrained)": results["base"], "after SFT": results["sft"], "after SFT + GRPO": results["grpo"]},
          f"held-out demo test split (n={results['grpo']['n']}); baselines: question-only "
          f"{b.get('question_only', float('nan')):.3f}, majority {b.get('majority', float('nan')):.3f}")
    print(f"GRPO vs SFT on the same {results['grpo']['n']} questions: fixed {change['fixed']}, broke "
          f"{change['broke']} (McNemar p {pval(change['p_value'])}; below 0.05: more than chance)")
    print("seconds per stage: " + ", ".join(f"{k} {v}" for k, v in seconds.items()) +
          f"; total {report['total_seconds']} (stage times; this run took {time.time() - t0:.0f}s)")


def ablation(args):
    """The paper's ablation on the demo: each row is a full run, evaluated on the same test split."""
    out, seconds = args.out, {}
    os.makedirs(out, exist_ok=True)
    main_out = args.main  # the main job (SFT, SFT + GRPO): reused when `make demo` already ran it
    main(argparse.Namespace(**{**vars(args), "out": main_out, "ablation": False, "fresh": False}))
    sft_dir = os.path.join(main_out, "sft")
    grpo = [PY, "grpo.py", "--data", "demo", "--max_steps", str(args.grpo_steps), "--seed", str(args.seed)]
    # each variant changes one thing against the main job's GRPO: its start, or one reward's weight (0: off)
    variants = {"GRPO without SFT": ["--ckpt", "tiny"]}
    for r in ("accuracy", "format", "fact", "consistency"):
        variants[f"SFT + GRPO without {r}"] = ["--ckpt", sft_dir, f"--w_{r}", "0"]
    results = {"SFT only": json.load(open(os.path.join(main_out, "eval_sft", "metrics.json"))),
               "SFT + GRPO": json.load(open(os.path.join(main_out, "eval_grpo", "metrics.json")))}
    folder = lambda name: os.path.join(out, name.lower().replace(" + ", "_").replace(" ", "_"))
    for name, flags in variants.items():
        d = folder(name)
        if args.fresh:
            shutil.rmtree(d, ignore_errors=True)
        run(grpo + flags + ["--out", d], os.path.join(d, "state.json"), seconds, name, args.fresh)
        results[name] = evaluate_ckpt(d, os.path.join(d, "eval"), "eval " + name, seconds, args.fresh)
    # each GRPO run against SFT alone on the same questions: answers fixed / broken, McNemar p
    dirs = {"SFT + GRPO": os.path.join(main_out, "eval_grpo")}
    dirs.update({name: os.path.join(folder(name), "eval") for name in variants})
    vs_sft = {name: paired(os.path.join(main_out, "eval_sft"), d) for name, d in dirs.items()}
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump({**results, "vs_sft": vs_sft, "seconds": seconds}, f, indent=1)
    table(results, "ablation on the held-out demo test split")
    for name, c in vs_sft.items():
        print(f"{name:>32} vs SFT only: fixed {c['fixed']:3d}, broke {c['broke']:3d}, McNemar p {pval(c['p_value'])}")
    print("seconds per run: " + ", ".join(f"{k} {v}" for k, v in seconds.items()))


if __name__ == "__main__":
    a = parser.parse_args()
    if a.plot:
        plot(a.plot)
    elif a.ablation:
        ablation(a)
    else:
        main(a)
