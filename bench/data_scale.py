"""
bench/data_scale.py: peak memory and time of every stage on a small and a large training split (issue 35: data at
any scale). A stage whose memory grows with the split holds it whole somewhere; the target is large / small within
1.15 for every command, and a second data.load (the row cache) under 5 s.

Two synthetic sets from bench/synth_pmc.py (PMC-VQA-like: small PNGs, ~0.66 images a question, the hub's parquet
layout), --small and --large questions, both with --test_rows 2000 and --val_rows 200 so that only train grows.
For each size N, on the set in WORK/pmc_N, each of these runs as a child process from the repo root:

    load        python -c "...data.load(DIR, 'train')..." WORK/pmc_N    the first load: builds the row cache
    load_again  the same command again                                  must read the cache
    retrieve    python retrieve.py --data WORK/pmc_N --split train --corpus cxr-glossary --out WORK/pl_N.jsonl
    sft         python sft.py --data WORK/pl_N.jsonl --model tiny --max_steps 20 --batch_size 8 ... --out WORK/sft_N
    grpo        python grpo.py --ckpt WORK/sft_N --data WORK/pmc_N --split train --max_steps 3 ... --out WORK/grpo_N
    eval        python evaluate.py --ckpt WORK/sft_N --data WORK/pmc_N --split test --limit 2000 ...
                (its baselines read the whole train split, as a user's run does)

    python bench/data_scale.py                                      # 20,000 and 200,000 questions
    python bench/data_scale.py --only load --reuse                  # the loads again, on the sets already made
    python bench/data_scale.py --small 300 --large 600 --out /tmp/data_scale_smoke.json   # the script itself

Peak memory is the child's ru_maxrss from os.wait4, which on Linux is the largest of the child and of every
descendant it waited for: the process tree's peak process (not the sum of processes alive together; these commands
are plain python, without torchrun). Children run with OMP_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false and
MEDFACT_CACHE=WORK/cache, emptied before each size's first load. Each step's outputs in WORK are deleted before it
runs (retrieve.py would otherwise append to the last run's). A child that fails or passes --timeout is recorded
(its exit status and the last lines of its stderr) and the rest go on. The results JSON (--out) has, for each step
and size, the peak RSS in MB, the seconds, the command (WORK for the work folder), and per step the ratio large /
small; with the machine, the date and the commit of each run. Steps not run this time keep their earlier numbers
when --out holds a run of the same sizes.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from eval_memory import commit  # noqa: E402  (the measured checkout's commit, "+" when it has changes)

STEPS = ["load", "load_again", "retrieve", "sft", "grpo", "eval"]
RSS_TARGET, LOAD_AGAIN_TARGET = 1.15, 5.0

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--small", type=int, default=20000, help="questions in the small set (all splits)")
parser.add_argument("--large", type=int, default=200000, help="questions in the large set (all splits)")
parser.add_argument("--test_rows", type=int, default=2000, help="test questions in both sets (eval's --limit)")
parser.add_argument("--val_rows", type=int, default=200, help="validation questions in both sets")
parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "medfact_data_scale"),
                    help="where the sets, the cache and the stages' outputs go")
parser.add_argument("--only", default=",".join(STEPS),
                    help=f"comma list of steps to run ({', '.join(STEPS)}; load runs load_again too)")
parser.add_argument("--reuse", action="store_true", help="keep a set already in WORK made with the same sizes")
parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds a command may run before it is killed")
parser.add_argument("--out", default=os.path.join("bench", "results", "data_scale.json"), help="results JSON")

# the first and the second load: rows read, and the seconds data.load took inside the process
LOAD = ("import sys, time; t = time.time(); import data; t1 = time.time(); rows = data.load(sys.argv[1], 'train'); "
        "print('rows', len(rows), 'load_s', round(time.time() - t1, 2), 'import_s', round(t1 - t, 2))")


def commands(n, work, args):
    """{step: argv} for the set of n questions; paths under `work`."""
    d, pl, sft = (os.path.join(work, f) for f in (f"pmc_{n}", f"pl_{n}.jsonl", f"sft_{n}"))
    return {
        "load": ["-c", LOAD, d],
        "load_again": ["-c", LOAD, d],
        "retrieve": ["retrieve.py", "--data", d, "--split", "train", "--corpus", "cxr-glossary", "--out", pl],
        "sft": ["sft.py", "--data", pl, "--model", "tiny", "--max_steps", "20", "--batch_size", "8", "--warmup", "2",
                "--eval_every", "0", "--val_frac", "0", "--log_every", "10", "--out", sft],
        "grpo": ["grpo.py", "--ckpt", sft, "--data", d, "--split", "train", "--max_steps", "3", "--prompts_per_step",
                 "4", "--group_size", "2", "--max_new_tokens", "16", "--micro_batch", "8", "--eval_every", "0",
                 "--out", os.path.join(work, f"grpo_{n}")],
        "eval": ["evaluate.py", "--ckpt", sft, "--data", d, "--split", "test", "--limit", str(args.test_rows),
                 "--max_new_tokens", "16", "--batch_size", "64", "--quiet",
                 "--out", os.path.join(work, f"eval_{n}.json")],
    }


def outputs(step, n, work):
    """What a step writes in `work`: deleted before it runs."""
    names = {"retrieve": [f"pl_{n}.jsonl", f"pl_{n}.passages.jsonl", f"pl_{n}_images"], "sft": [f"sft_{n}"],
             "grpo": [f"grpo_{n}"], "eval": [f"eval_{n}.json", f"eval_{n}.predictions.jsonl"]}
    return [os.path.join(work, f) for f in names.get(step, [])]


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def shown(argv, work):
    """A command as the results record it: python, repo-relative scripts, WORK for the work folder."""
    quote = lambda a: f'"{a}"' if " " in a else a  # noqa: E731
    return " ".join(["python"] + [quote(a.replace(work, "WORK")) for a in argv])


# -----------------------------------------------------------------------------
# one child: its exit status, peak RSS and wall time

def run(argv, env, log, timeout):
    t = time.time()
    with open(log + ".out", "w") as out, open(log + ".err", "w") as err:
        proc = subprocess.Popen([sys.executable] + argv, cwd=ROOT, env=env, stdout=out, stderr=err,
                                start_new_session=True)  # its own process group: a timeout kills the whole tree
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() - t > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    res = {"exit": proc.returncode, "seconds": round(time.time() - t, 1),
           "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}  # ru_maxrss: KiB on Linux
    if time.time() - t > timeout:
        res["timed_out"] = True
    if proc.returncode != 0:
        with open(log + ".err", errors="replace") as f:
            res["stderr_tail"] = [line.rstrip() for line in f.readlines()[-12:]]
    with open(log + ".out", errors="replace") as f:
        said = f.read().split()
    if "load_s" in said:  # the load command's own line: rows, seconds in data.load, seconds importing data
        i = said.index("rows")
        res.update(rows=int(said[i + 1]), load_s=float(said[i + 3]), import_s=float(said[i + 5]))
    return res


def make_set(n, work, args, env):
    """WORK/pmc_N from bench/synth_pmc.py in a child (kept with --reuse when its sizes match); its report."""
    folder = os.path.join(work, f"pmc_{n}")
    want = {"rows": n, "test_rows": args.test_rows, "val_rows": args.val_rows}
    report = os.path.join(folder, "synth_pmc.json")
    if args.reuse and os.path.exists(report):
        with open(report) as f:
            made = json.load(f)
        if all(made["args"].get(k) == v for k, v in want.items()):
            print(f"{n}: reusing {folder}", flush=True)
            return {"splits": made["splits"], "seconds": made["seconds"], "reused": True}
    remove(folder)
    argv = [os.path.join("bench", "synth_pmc.py"), "--out", folder, "--rows", str(n),
            "--test_rows", str(args.test_rows), "--val_rows", str(args.val_rows)]
    res = run(argv, env, os.path.join(work, "logs", f"synth_{n}"), args.timeout)
    if res["exit"] != 0:
        raise SystemExit(f"error: {shown(argv, work)} failed:\n" + "\n".join(res.get("stderr_tail", [])))
    with open(report) as f:
        made = json.load(f)
    print(f"{n}: made {folder} in {made['seconds']} s", flush=True)
    return {"splits": made["splits"], "seconds": made["seconds"], "command": shown(argv, work)}


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            mem_gb = round(int(f.readline().split()[1]) / 2 ** 20, 1)  # MemTotal, kB
    except OSError:
        mem_gb = None
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)), "memory_gb": mem_gb,
            "python": platform.python_version()}


def table(res):
    lines = [f"{'step':<11} {'small MB':>9} {'large MB':>9} {'ratio':>6} {'small s':>8} {'large s':>8}  exit"]
    for step in STEPS:
        s = res["steps"].get(step)
        if not s:
            continue
        a, b = s.get("small", {}), s.get("large", {})
        ratio = s.get("rss_ratio")
        lines.append(f"{step:<11} {a.get('peak_rss_mb', '-'):>9} {b.get('peak_rss_mb', '-'):>9} "
                     f"{ratio if ratio is not None else '-':>6} {a.get('seconds', '-'):>8} {b.get('seconds', '-'):>8}  "
                     f"{a.get('exit', '-')} / {b.get('exit', '-')}")
    return "\n".join(lines)


def main(args):
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    only += ["load_again"] if "load" in only and "load_again" not in only else []
    unknown = sorted(set(only) - set(STEPS))
    if unknown:
        raise SystemExit(f"error: unknown step(s) {', '.join(unknown)} in --only (steps: {', '.join(STEPS)})")
    work = os.path.abspath(args.work)
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    cache = os.path.join(work, "cache")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MEDFACT_CACHE": cache}
    # the command as run, the work folder as WORK (a machine path is no use to a reader)
    argv = ["WORK" if prev == "--work" else "--work=WORK" if a.startswith("--work=") else a
            for prev, a in zip([""] + sys.argv[1:], sys.argv[1:])]
    res = {"command": " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + argv),
           "sizes": {}, "steps": {}}
    if os.path.exists(args.out):  # earlier numbers of the steps not run now, if they measured the same sizes
        with open(args.out) as f:
            old = json.load(f)
        if {k: v.get("rows") for k, v in old.get("sizes", {}).items()} == {"small": args.small, "large": args.large}:
            res["steps"] = {k: v for k, v in old.get("steps", {}).items() if k not in only}
    res.update(machine=machine(), date=time.strftime("%Y-%m-%d"), commit=commit(ROOT),
               env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MEDFACT_CACHE": "WORK/cache"},
               targets={"rss_ratio": RSS_TARGET, "load_again_s": LOAD_AGAIN_TARGET})
    for size, n in (("small", args.small), ("large", args.large)):
        made = make_set(n, work, args, env)
        if not made.get("reused"):
            remove(cache)  # rows cached from an earlier set at this path
        res["sizes"][size] = {"rows": n, **{f"{s}_rows": made["splits"][s]["rows"] for s in ("train", "val", "test")},
                              "train_images": made["splits"]["train"]["images"],
                              "mb": round(sum(s["mb"] for s in made["splits"].values()), 1),
                              "made_s": made["seconds"]}
        for step, step_argv in commands(n, work, args).items():
            if step not in only:
                continue
            if step == "load":
                remove(cache)  # the first load builds the cache
            for path in outputs(step, n, work):
                remove(path)
            print(f"{n}: {step}: {shown(step_argv, work)}", flush=True)
            r = run(step_argv, env, os.path.join(work, "logs", f"{step}_{n}"), args.timeout)
            r["stderr_tail"] = [line.replace(work, "WORK").replace(ROOT, ".") for line in r.get("stderr_tail", [])] \
                or None
            r = {"command": shown(step_argv, work), **{k: v for k, v in r.items() if v is not None},
                 "commit": res["commit"], "date": res["date"]}
            print(f"{n}: {step}: exit {r['exit']}, peak RSS {r['peak_rss_mb']} MB, {r['seconds']} s"
                  + (f" (data.load {r['load_s']} s, {r['rows']} rows)" if "load_s" in r else ""), flush=True)
            for line in r.get("stderr_tail") or []:
                print(f"    {line}")
            res["steps"].setdefault(step, {})[size] = r
    for step, s in res["steps"].items():
        a, b = s.get("small", {}), s.get("large", {})
        ok = a.get("exit") == 0 and b.get("exit") == 0
        s["rss_ratio"] = round(b["peak_rss_mb"] / a["peak_rss_mb"], 3) if ok else None
        s["within_target"] = ok and s["rss_ratio"] <= RSS_TARGET and (
            step != "load_again" or b.get("load_s", b["seconds"]) < LOAD_AGAIN_TARGET)
    res["steps"] = {k: res["steps"][k] for k in STEPS if k in res["steps"]}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(table(res))
    print(f"wrote {args.out} (target: large / small peak RSS within {RSS_TARGET}, load_again under "
          f"{LOAD_AGAIN_TARGET:g} s)")


if __name__ == "__main__":
    main(parser.parse_args())
