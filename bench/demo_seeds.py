"""
bench/demo_seeds.py: `make demo` on several seeds and torch thread counts, one fresh run each, tabulated.

CPU arithmetic differs with the number of threads (and between machines), so one demo run proves
little: this runs `python demo.py --seed S --fresh` with OMP_NUM_THREADS=T for every (S, T), one
after the other on an otherwise idle machine, and reports per run the held-out accuracy after SFT
and after SFT + GRPO, the paired comparison (answers fixed / broken, exact McNemar p) and the wall
time of the whole run.

    python bench/demo_seeds.py                                     # seeds 0 1 2 x threads 1 2 (~75 min)
    python bench/demo_seeds.py --out bench/results/demo_seeds.json
    python bench/demo_seeds.py --seeds 1 --threads 2 --no_run      # tabulate runs that exist
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(argv, root=ROOT):
    """The command line as a reader pastes it at the repo root: an absolute path in the repo or beside it
    (in its parent folder) relative to the root; any other word as given."""
    root = os.path.realpath(root)
    near = (root + os.sep, os.path.dirname(root) + os.sep)
    rel = lambda a: os.path.relpath(os.path.realpath(a), root) if a.startswith("/") and (
        os.path.realpath(a) == root or os.path.realpath(a).startswith(near)) else a
    return " ".join(["python bench/demo_seeds.py"] + [rel(a) for a in argv])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="demo.py --seed values")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="OMP_NUM_THREADS values")
    parser.add_argument("--runs", default="runs/demo_seeds", help="folder of the runs (one per seed and threads)")
    parser.add_argument("--no_run", action="store_true", help="only tabulate the runs already in --runs")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args()
    results = []
    for seed in args.seeds:
        for threads in args.threads:
            folder = os.path.join(args.runs, f"seed{seed}_threads{threads}")
            if not args.no_run:
                t = time.time()
                subprocess.run([sys.executable, "demo.py", "--out", folder, "--seed", str(seed), "--fresh"],
                               cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
                with open(os.path.join(ROOT, folder, "wall_seconds"), "w") as f:
                    f.write(f"{time.time() - t:.0f}\n")
            report = json.load(open(os.path.join(ROOT, folder, "report.json")))
            wall = open(os.path.join(ROOT, folder, "wall_seconds")).read().strip()
            results.append({"seed": seed, "threads": threads, "sft": report["sft"]["accuracy"],
                            "grpo": report["grpo"]["accuracy"], "paired": report["grpo_vs_sft"],
                            "selected": report.get("grpo_selected"), "wall_seconds": int(wall)})
    pval = lambda p: "< 0.001" if p < 0.001 else f"{p:.3f}"
    print("| seed | threads | SFT | SFT + GRPO | fixed / broken | p | minutes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        p = r["paired"]
        print(f"| {r['seed']} | {r['threads']} | {r['sft']:.3f} | {r['grpo']:.3f} | {p['fixed']} / {p['broken']} | "
              f"{pval(p['p'])} | {r['wall_seconds'] / 60:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": command(sys.argv[1:]), "runs": results}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
