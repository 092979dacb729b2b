"""
bench/demo_seeds.py: `make demo` on several seeds and torch thread counts, one fresh run each, tabulated.

CPU arithmetic differs with the number of threads (and between machines), so one demo run proves
little: this runs `python demo.py --seed S --fresh` with OMP_NUM_THREADS=T for every (S, T), one
after the other on an otherwise idle machine, and reports per run the held-out accuracy after SFT
and after SFT + GRPO, the paired comparison (answers fixed / broken, exact McNemar p) and the wall
time of the whole run. The seed sets everything random, the model's initial weights included.

The equal-compute control (--control_steps K, 0: none): the run's SFT model trained on with SFT for K
more steps, at the learning rate its schedule ended on (constant), as long as GRPO ran: is it GRPO that
helps, or more training? It is scored on the same test questions, against SFT and against SFT + GRPO.
The pooled rows add the fixed / broken answers of every seed (each question of each seed is one pair)
and give their exact McNemar p (evaluate.mcnemar).

    python bench/demo_seeds.py                                     # seeds 0 1 2 x threads 1 2 (~75 min)
    python bench/demo_seeds.py --threads 2 --control_steps 500 --out bench/results/demo_seeds.json
    python bench/demo_seeds.py --seeds 1 --threads 2 --no_run      # tabulate runs that exist
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # evaluate.py (paired, mcnemar), when run as bench/demo_seeds.py


def command(argv, root=ROOT, script="bench/demo_seeds.py"):
    """The command line as a reader pastes it at the repo root: an absolute path in the repo or beside it
    (in its parent folder) relative to the root; any other word as given."""
    root = os.path.realpath(root)
    near = (root + os.sep, os.path.dirname(root) + os.sep)
    rel = lambda a: os.path.relpath(os.path.realpath(a), root) if a.startswith("/") and (
        os.path.realpath(a) == root or os.path.realpath(a).startswith(near)) else a
    return " ".join(["python", script] + [rel(a) for a in argv])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="demo.py --seed values")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="OMP_NUM_THREADS values")
    parser.add_argument("--runs", default="runs/demo_seeds", help="folder of the runs (one per seed and threads)")
    parser.add_argument("--no_run", action="store_true", help="only tabulate the runs already in --runs")
    parser.add_argument("--control_steps", type=int, default=0,
                        help="the equal-compute control: K more SFT steps from the run's SFT model (0: none)")
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
            if args.control_steps:
                results[-1]["control"] = control(folder, seed, threads, args.control_steps, args.no_run)
    pooled = pool(results)
    print(table(results, pooled))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": command(sys.argv[1:]), "runs": results, "pooled": pooled}, f, indent=1)
        print(f"wrote {args.out}")


def control(folder, seed, threads, steps, no_run):
    """The equal-compute control of one run: its SFT model, `steps` more SFT steps at the lr its schedule
    ended on, scored on the test split; paired against the run's SFT and SFT + GRPO models."""
    from evaluate import paired
    run = os.path.join(ROOT, folder)
    sft_args = json.load(open(os.path.join(run, "sft", "args.json")))
    out, metrics = os.path.join(run, f"control_{steps}"), os.path.join(run, f"eval_control_{steps}", "metrics.json")
    if not no_run:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run([sys.executable, "sft.py", "--data", os.path.join(run, "pseudo.jsonl"), "--model",
                        os.path.join(run, "sft"), "--out", out, "--max_steps", str(steps), "--seed", str(seed),
                        "--lr", str(sft_args["lr"] * sft_args["min_lr_frac"]), "--warmup", "0", "--min_lr_frac", "1"],
                       cwd=ROOT, check=True, env=env)
        subprocess.run([sys.executable, "evaluate.py", "--ckpt", out, "--data", "demo", "--split", "test",
                        "--out", metrics, "--quiet", "--no_baselines"], cwd=ROOT, check=True, env=env)
    sft, grpo = (os.path.join(run, f"eval_{s}", "metrics.json") for s in ("sft", "grpo"))
    return {"steps": steps, "accuracy": json.load(open(metrics))["accuracy"],
            "vs_sft": paired(sft, metrics), "grpo_vs_control": paired(metrics, grpo)}


def pool(results):
    """Fixed / broken answers added over the runs (each question of each run one pair), with the exact
    McNemar p of the sums: GRPO against SFT, and against the control where there is one."""
    from evaluate import mcnemar
    out = {}
    for name, key in (("grpo_vs_sft", lambda r: r["paired"]),
                      ("grpo_vs_control", lambda r: r.get("control", {}).get("grpo_vs_control")),
                      ("control_vs_sft", lambda r: r.get("control", {}).get("vs_sft"))):
        parts = [key(r) for r in results]
        if parts and all(parts):
            fixed, broken = sum(p["fixed"] for p in parts), sum(p["broken"] for p in parts)
            out[name] = {"fixed": fixed, "broken": broken, "p": round(mcnemar(fixed, broken), 6)}
    for name in ("sft", "grpo"):
        out[name] = round(sum(r[name] for r in results) / len(results), 4) if results else None
    if results and all("control" in r for r in results):
        out["control"] = round(sum(r["control"]["accuracy"] for r in results) / len(results), 4)
    return out


def table(results, pooled):
    """The Markdown table: one row per run, then the pooled row."""
    pval = lambda p: "< 0.001" if p < 0.001 else f"{p:.3f}"  # noqa: E731
    pair = lambda p: f"{p['fixed']} / {p['broken']} ({pval(p['p'])})" if p else "-"  # noqa: E731
    acc = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = ["| seed | threads | SFT | SFT + GRPO | control | GRPO vs SFT: fixed / broken (p) | GRPO vs control "
             "| minutes |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        c = r.get("control") or {}
        lines.append(f"| {r['seed']} | {r['threads']} | {acc(r['sft'])} | {acc(r['grpo'])} | {acc(c.get('accuracy'))} "
                     f"| {pair(r['paired'])} | {pair(c.get('grpo_vs_control'))} | {r['wall_seconds'] / 60:.1f} |")
    if len(results) > 1:
        lines.append(f"| pooled | | {acc(pooled['sft'])} | {acc(pooled['grpo'])} | {acc(pooled.get('control'))} | "
                     f"{pair(pooled['grpo_vs_sft'])} | {pair(pooled.get('grpo_vs_control'))} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
