"""
bench/retrieve_scale.py: retrieve.py on a large split whose images come embedded (parquet).

PathVQA-like data: N questions over K distinct JPEG images, in the Hugging Face parquet layout
(data/train-00000-of-00001.parquet: columns image {bytes, path}, question, answer), the image bytes
repeated in every row as the hub's exports hold them. The images are pathology-like (smooth colour
fields and grain, --size px square): their PNG re-encoding is ~0.5 MB, as PathVQA's was. This runs
retrieve.py from --repo on the first --limit rows (all by default) in a subprocess and reports rows
per second and the megabytes it wrote (the pseudo-labels and OUT_images/).

    python bench/retrieve_scale.py --out bench/results/retrieve_scale.json                     # 20,000 rows
    python bench/retrieve_scale.py --repo ../main --limit 1000 --out /tmp/retrieve_before.json  # other code

The split is built once in --workdir and reused (delete it to rebuild). Issue 18's target: pseudo-labels
that point at images or store each distinct image once, and take minutes, not most of an hour.
"""

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from eval_memory import commit  # noqa: E402  (the measured checkout's commit)

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--out", required=True, help="results JSON")
parser.add_argument("--rows", type=int, default=20000, help="questions in the split")
parser.add_argument("--images", type=int, default=2500, help="distinct images the questions cycle over")
parser.add_argument("--size", type=int, default=448, help="image side, pixels")
parser.add_argument("--limit", type=int, default=None, help="retrieve.py --limit: the first N rows only")
parser.add_argument("--repo", default=ROOT, help="the checkout whose retrieve.py runs")
parser.add_argument("--workdir", default="/tmp/retrieve_scale", help="where the split and the output go")


def pathology_like(rng, size):
    """A smooth colour field with grain: JPEG ~70 KB, PNG ~0.45 MB at 448 px."""
    import numpy as np
    from PIL import Image
    low = Image.fromarray((rng.random((size // 32, size // 32, 3)) * 255).astype(np.uint8))
    pixels = np.asarray(low.resize((size, size), Image.BICUBIC)).astype(np.float32)
    pixels += rng.normal(0, 14, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def build_split(folder, n_rows, n_images, size):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = os.path.join(folder, "data", "train-00000-of-00001.parquet")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng, jpegs = np.random.default_rng(0), []
    for _ in range(n_images):
        buf = io.BytesIO()
        pathology_like(rng, size).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    questions = ["Is this gland normal?", "What type of tissue is shown?", "Is there necrosis?",
                 "Which stain is used?"]
    answers = ["yes", "epithelium", "no", "hematoxylin and eosin"]
    table = pa.table({"image": [{"bytes": jpegs[i % n_images], "path": None} for i in range(n_rows)],
                      "question": [questions[i % 4] for i in range(n_rows)],
                      "answer": [answers[i % 4] for i in range(n_rows)]})
    pq.write_table(table, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def folder_mb(paths):
    total = 0
    for p in paths:
        if os.path.isfile(p):
            total += os.path.getsize(p)
        for d, _, names in os.walk(p) if os.path.isdir(p) else []:
            total += sum(os.path.getsize(os.path.join(d, n)) for n in names)
    return total / 2 ** 20


def main(args):
    split = os.path.join(args.workdir, f"split_{args.rows}x{args.images}x{args.size}")
    t = time.time()
    parquet = build_split(split, args.rows, args.images, args.size)
    print(f"split: {parquet} ({os.path.getsize(parquet) / 2 ** 20:.0f} MB, built or found in {time.time() - t:.0f} s)")
    out_dir = os.path.join(args.workdir, "out")
    shutil.rmtree(out_dir, ignore_errors=True)
    out = os.path.join(out_dir, "pseudo.jsonl")
    cmd = [sys.executable, "retrieve.py", "--data", split, "--split", "train", "--corpus", "cxr-glossary", "--out", out]
    cmd += ["--limit", str(args.limit)] if args.limit else []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t = time.time()
    proc = subprocess.run(cmd, cwd=args.repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.time() - t
    if proc.returncode != 0:
        raise SystemExit(f"error: retrieve.py failed:\n{proc.stderr[-3000:]}")
    rows = sum(1 for _ in open(out))
    images = os.path.splitext(out)[0] + "_images"
    wrote = re.search(r"wrote (\d+) rows to .* in ([\d.]+)s", proc.stdout)
    result = {"command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]), "commit": commit(args.repo),
              "rows": rows, "distinct_images": args.images, "image_size": args.size, "seconds": round(seconds, 1),
              "rows_per_s": round(rows / seconds, 1), "retrieve_says": wrote.group(0) if wrote else None,
              "mb_written": round(folder_mb([out, images]), 1), "mb_images": round(folder_mb([images]), 1),
              "image_files": len(os.listdir(images)) if os.path.isdir(images) else 0}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(parser.parse_args())
