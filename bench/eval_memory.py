"""
bench/eval_memory.py: peak memory of evaluate.py against the size of the split.

evaluate.py decodes each batch's images when its turn comes, so its memory should not grow with the
number of questions (it used to decode the whole split first: 12.6 GB on 6,719 pathology questions).
This builds a JSONL split of N questions over the same K real images (SLAKE's, by default: the first K
of Slake1.0/imgs/*/source.jpg, most 512 or 1024 px square), repeated, and runs evaluate.py on it once
per N, each in a fresh process that reports its own peak resident memory (getrusage ru_maxrss).

    python bench/eval_memory.py --out bench/results/eval_memory.json                     # 500 and 5,000
    python bench/eval_memory.py --repo ../main --questions 500 1500 --out /tmp/before.json  # other code

--repo runs another checkout's evaluate.py on the same split (how the "before" numbers were taken).
Target (issue 15): 500 and 5,000 questions within 300 MB of each other.

--data DIR evaluates a split that exists instead (e.g. the parquet layout of bench/fake_pathvqa.py, images
embedded), its first N questions for each N (--limit), baselines included, as a user's run (issue 35: 3,000
and 6,719 questions of a parquet split within 150 MB of each other):

    python bench/fake_pathvqa.py --out runs/fake_pathvqa
    python bench/eval_memory.py --data runs/fake_pathvqa --questions 3000 6719 --out bench/results/eval_memory_parquet.json
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--out", required=True, help="results JSON")
parser.add_argument("--questions", type=int, nargs="+", default=[500, 5000], help="split sizes to run")
parser.add_argument("--images", default=os.path.join(ROOT, "..", "shared", "data", "slake", "Slake1.0", "imgs"),
                    help="a folder of images (searched for */source.jpg, else *.jpg / *.png)")
parser.add_argument("--n_images", type=int, default=300, help="distinct images the questions cycle over")
parser.add_argument("--ckpt", default="tiny", help="the model evaluate.py loads (tiny: built in-process)")
parser.add_argument("--max_new_tokens", type=int, default=8, help="short answers: memory, not speed, is measured")
parser.add_argument("--batch_size", type=int, default=64, help="evaluate.py's --batch_size")
parser.add_argument("--repo", default=ROOT, help="the checkout whose evaluate.py runs")
parser.add_argument("--workdir", default=None, help="where the split is written (default: a temporary folder)")
parser.add_argument("--data", default=None, help="a split that exists (its test split's first N questions; baselines on)")

# the child: evaluate.py as its command line runs it, then its own peak memory on stderr
CHILD = """
import resource, runpy, sys
sys.argv = ["evaluate.py"] + sys.argv[1:]
try:
    runpy.run_path("evaluate.py", run_name="__main__")
finally:
    print("peak_rss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def split_file(folder, images, n):
    """N yes/no questions over the images, in turn; paths absolute."""
    path = os.path.join(folder, f"split_{n}.jsonl")
    with open(path, "w") as f:
        for i in range(n):
            yes = i % 2 == 0
            f.write(json.dumps({"id": f"q{i}", "image": images[i % len(images)], "split": "test",
                                "question": "Is this a CT scan?" if yes else "Is this an MRI?",
                                "answer": "yes" if yes else "no", "answer_type": "closed"}) + "\n")
    return path


def commit(repo):
    """The measured checkout's commit, "+" when its tracked files differ from it."""
    git = ["git", "-C", repo]
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(git + ["diff", "--quiet", "HEAD"]).returncode != 0
    return head + ("+" if dirty else "")


def main(args):
    images = sorted(glob.glob(os.path.join(args.images, "*", "source.jpg")))
    images = images or sorted(glob.glob(os.path.join(args.images, "*.jpg")) +
                              glob.glob(os.path.join(args.images, "*.png")))
    images = [os.path.abspath(p) for p in images[:args.n_images]]
    if not images and not args.data:
        raise SystemExit(f"error: no images under {args.images} (--images)")
    folder = args.workdir or tempfile.mkdtemp(prefix="eval_memory_")
    os.makedirs(folder, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
    runs = []
    for n in args.questions:
        split = ["--data", os.path.abspath(args.data), "--limit", str(n)] if args.data else \
            ["--data", split_file(folder, images, n), "--no_baselines"]
        cmd = [sys.executable, "-c", CHILD, "--ckpt", args.ckpt, *split, "--split", "test", "--max_new_tokens",
               str(args.max_new_tokens), "--batch_size", str(args.batch_size), "--quiet",
               "--out", os.path.join(folder, f"eval_{n}", "metrics.json")]
        t = time.time()
        proc = subprocess.run(cmd, cwd=args.repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        peak = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("peak_rss_kb ")]
        if proc.returncode != 0 or not peak:
            raise SystemExit(f"error: evaluate.py on {n} questions failed:\n{proc.stderr[-3000:]}")
        runs.append({"questions": n, "peak_rss_mb": round(int(peak[0]) / 1024, 1),
                     "seconds": round(time.time() - t, 1)})
        print(f"{n} questions of {args.data or f'{len(images)} images'}: peak RSS {runs[-1]['peak_rss_mb']} MB "
              f"({runs[-1]['seconds']} s)", flush=True)
    peaks = [r["peak_rss_mb"] for r in runs]
    result = {"command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]), "commit": commit(args.repo),
              "images": args.data or len(images), "ckpt": args.ckpt, "runs": runs, "spread_mb": round(max(peaks) - min(peaks), 1)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"spread of peak RSS: {result['spread_mb']} MB (targets: 300 MB, issue 15; 150 MB, issue 35); wrote {args.out}")


if __name__ == "__main__":
    main(parser.parse_args())
