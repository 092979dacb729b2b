"""
bench/demo_cold_start.py: the demo with a cold start (issue #34): pseudo-labels for only part of the training
questions, SFT on those, then GRPO on every training question (its accuracy reward reads the gold answer), against
the equal-compute control (the same SFT model, --control_steps more SFT steps on the same pseudo-labels, as long
as GRPO ran).

Why: with a pseudo-label for every training question (the demo before issue #34), more SFT taught what GRPO's
reward does, and the control beat GRPO (docs/EXPERIMENTS.md 1.6). Labelling costs a teacher call (or a person) a
question; a gold answer costs nothing more. Here SFT sees the first --labelled questions (retrieve.py --limit),
GRPO all 4,400. The design was chosen on the val split (--split val), then scored once on test; it is make demo's,
and its defaults are demo.py's. One run per seed, one thread each, each stage the command a user types (written
to SEED/commands.txt), skipped when done:

    retrieve.py --limit L -> sft.py (--sft_steps) -> grpo.py (--grpo_steps, --temperature, --grpo_lr)
                          -> the control: sft.py from the SFT model, --control_steps at the lr SFT ended on
    evaluate.py --split SPLIT on each of the three; paired fixed / broken answers, exact McNemar p, pooled

    python bench/demo_cold_start.py --seeds 0 1 2 --out bench/results/demo_cold_start.json
    python bench/demo_cold_start.py --seeds 0 --split val --grpo_lr 5e-5 --runs runs/cold_val   # a val probe
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # evaluate.py (paired), demo.py (the design)
sys.path.insert(0, os.path.join(ROOT, "bench"))  # demo_seeds.py (pool, table)


def main():
    import demo  # make demo's design: the defaults below are its own, so the two cannot drift apart
    design = lambda k: demo.parser.get_default(k)  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--seed of every stage")
    parser.add_argument("--labelled", type=int, default=design("labelled"),
                        help="training questions with a pseudo-label (of 4,400)")
    parser.add_argument("--sft_steps", type=int, default=design("sft_steps"), help="SFT steps of 32")
    parser.add_argument("--grpo_steps", type=int, default=design("grpo_steps"), help="GRPO steps of 96 prompts x 6")
    parser.add_argument("--temperature", type=float, default=design("temperature"), help="GRPO's sampling temperature")
    parser.add_argument("--grpo_lr", type=float, default=design("grpo_lr"), help="GRPO's learning rate")
    # as long as GRPO: its 60 steps took as long as 497 and 525 SFT steps at one thread (seeds 1, 2) and 541 in make
    # demo's run at two (EXPERIMENTS 1.6); the longest, rounded
    parser.add_argument("--control_steps", type=int, default=540, help="the control's SFT steps (as long as GRPO)")
    parser.add_argument("--split", default="test", help="the split scored: val to choose a design, test to report")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every stage")
    parser.add_argument("--runs", default="runs/demo_cold_start", help="one folder per seed: RUNS/seedS")
    parser.add_argument("--no_run", action="store_true", help="only tabulate the runs already in --runs")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args()
    os.chdir(ROOT)  # the stages' paths, as commands.txt gives them, are relative to the repo root
    from demo_seeds import command, pool, table
    results = [one_seed(args, seed) for seed in args.seeds]
    pooled = pool(results)
    print(table(results, pooled))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": command(sys.argv[1:], script="bench/demo_cold_start.py"),
                       "design": {k: getattr(args, k) for k in ("labelled", "sft_steps", "grpo_steps", "temperature",
                                                                 "grpo_lr", "control_steps", "split")},
                       "runs": results, "pooled": pooled}, f, indent=1)
        print(f"wrote {args.out}")


def one_seed(args, seed):
    """One seed's run (its stages unless done), scored on --split: the record demo_seeds.pool reads."""
    from evaluate import paired
    py, d = sys.executable, os.path.join(args.runs, f"seed{seed}")
    j = lambda *p: os.path.join(d, *p)  # noqa: E731
    stages = [
        (j("pseudo.jsonl"), ["retrieve.py", "--data", "demo", "--split", "train", "--limit", args.labelled,
                             "--seed", seed, "--out", j("pseudo.jsonl")]),
        (j("sft", "state.json"), ["sft.py", "--data", j("pseudo.jsonl"), "--model", "tiny", "--out", j("sft"),
                                  "--max_steps", args.sft_steps, "--seed", seed]),
        (j("grpo", "state.json"), ["grpo.py", "--ckpt", j("sft"), "--data", "demo", "--out", j("grpo"),
                                   "--max_steps", args.grpo_steps, "--seed", seed, "--temperature", args.temperature,
                                   "--lr", args.grpo_lr]),
        # the control: sft.py's default schedule ends at lr 2e-3 x 0.1, held there (demo_seeds.control's rule)
        (j("ctrl", "state.json"), ["sft.py", "--data", j("pseudo.jsonl"), "--model", j("sft"), "--out", j("ctrl"),
                                   "--max_steps", args.control_steps, "--seed", seed, "--lr", 2e-4, "--warmup", 0,
                                   "--min_lr_frac", 1])]
    metrics = {m: j(f"{args.split}_{m}", "metrics.json") for m in ("sft", "grpo", "ctrl")}
    stages += [(metrics[m], ["evaluate.py", "--ckpt", j(m), "--data", "demo", "--split", args.split,
                             "--out", metrics[m], "--quiet", "--no_baselines"]) for m in metrics]
    t = time.time()
    if not args.no_run:
        os.makedirs(d, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        for done, argv in stages:
            if not os.path.exists(done):
                argv = [str(a) for a in argv]
                with open(j("commands.txt"), "a") as f:
                    f.write("python " + " ".join(argv) + "\n")
                with open(j("log.txt"), "a") as log:
                    subprocess.run([py, *argv], env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
        with open(j("wall_seconds"), "a") as f:  # one line an invocation; the table adds them
            f.write(f"{time.time() - t:.0f}\n")
    acc = {m: json.load(open(p))["accuracy"] for m, p in metrics.items()}
    wall = sum(int(w) for w in open(j("wall_seconds"))) if os.path.exists(j("wall_seconds")) else 0
    return {"seed": seed, "threads": args.threads, "sft": acc["sft"], "grpo": acc["grpo"],
            "paired": paired(metrics["sft"], metrics["grpo"]),
            "control": {"steps": args.control_steps, "accuracy": acc["ctrl"],
                        "vs_sft": paired(metrics["sft"], metrics["ctrl"]),
                        "grpo_vs_control": paired(metrics["ctrl"], metrics["grpo"])},
            "wall_seconds": wall}


if __name__ == "__main__":
    main()
