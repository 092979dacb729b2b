"""
What does leaving zero-spread groups out of the reference and training passes save per GRPO step?

    python bench/grpo_zero_std.py --ckpt runs/demo/sft      # after `make demo`; ~3 minutes on 2 CPU cores
    OMP_NUM_THREADS=2 python bench/grpo_zero_std.py --steps 8 --repeats 2 --out bench/results/grpo_zero_std.json

Runs grpo.py itself (a subprocess, the demo's default settings, periodic eval off) from the same
checkpoint, alternating the default (groups whose rewards are all equal skip the reference and
training passes) and --train_zero_std (every group goes through them, as in TRL), --repeats
times each. The first step of each run is dropped as warm-up; reported are the medians over the
remaining steps of each phase of the step, read from metrics.jsonl, and the ratio of the step
times. Both sides sample the same completions at step 1 (same seed, same weights); the check
below says whether they did. Prints a table last; writes the results as JSON only with --out.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--ckpt", default="runs/demo/sft", help="the checkpoint both modes start from")
parser.add_argument("--steps", type=int, default=15, help="timed steps per run (one more is run as warm-up)")
parser.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating")
parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for grpo.py (default: inherited)")
parser.add_argument("--out", default=None, help="write the results as JSON here (default: print only; the "
                                                "committed results: bench/results/grpo_zero_std.json)")
PHASES = ("t_step", "t_generate", "t_score", "t_reference", "t_train")


def one_run(args, flags, work):
    out = tempfile.mkdtemp(dir=work)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    cmd = [sys.executable, os.path.join(ROOT, "grpo.py"), "--ckpt", args.ckpt, "--data", "demo", "--out", out,
           "--max_steps", str(args.steps + 1), "--eval_every", "0", *flags]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def main(args):
    if not os.path.exists(os.path.join(args.ckpt, "config.json")):
        raise SystemExit(f"{args.ckpt}: no checkpoint; run `make demo` first (or pass --ckpt)")
    modes = {"skip zero-spread groups (default)": [], "train every group (--train_zero_std)": ["--train_zero_std"]}
    recs = {m: [] for m in modes}
    first = {m: None for m in modes}
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.repeats):
            for m, flags in modes.items():
                print(f"run {r + 1}/{args.repeats}: {m}", flush=True)
                steps = one_run(args, flags, work)
                first[m] = first[m] or steps[0]
                recs[m] += steps[1:]
    same = [first[m]["reward"] for m in modes]
    result = {"ckpt": args.ckpt, "steps": args.steps, "repeats": args.repeats,
              "threads": args.threads or os.environ.get("OMP_NUM_THREADS"),
              "same_step1_rewards": same[0] == same[1],
              "modes": {m: {**{p: statistics.median(x[p] for x in rs) for p in PHASES},
                            "zero_std_groups": statistics.mean(x["zero_std_groups"] for x in rs),
                            "n_steps": len(rs)} for m, rs in recs.items()}}
    a, b = (result["modes"][m]["t_step"] for m in modes)
    result["speedup"] = b / a
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"\nGRPO step on {args.ckpt}, medians over {args.steps} x {args.repeats} steps per mode "
          f"(step-1 rewards identical: {result['same_step1_rewards']})")
    print(f"{'mode':>38} | " + " | ".join(f"{p[2:]:>9}" for p in PHASES) + " | zero-spread groups")
    for m, r in result["modes"].items():
        print(f"{m:>38} | " + " | ".join(f"{r[p]:8.2f}s" for p in PHASES) + f" | {r['zero_std_groups']:.2f}")
    print(f"step time ratio (every group / skip): {result['speedup']:.2f}x" + (f"; wrote {args.out}" if args.out else ""))


if __name__ == "__main__":
    main(parser.parse_args())
