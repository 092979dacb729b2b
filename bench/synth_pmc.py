"""
bench/synth_pmc.py: a PMC-VQA-sized synthetic set (200,000 questions over ~132,000 small images) in the Hugging Face
parquet export layout, to measure what data at scale costs each stage (issue 35; bench/data_scale.py).

PMC-VQA (227k questions over 149k images) is not on this machine. This draws a stand-in of its size: each image a
small PNG (48 to 96 px, grey or, for histology, RGB; ~1 to 5 KB) of a few shapes on a gradient with grain, drawn
from the image's facts by a seeded RNG, and each question one of a few templates about those facts, so the answers
can be read off the image (a model could learn the set, a question-only prior cannot):

    modality  CT, MRI, X-ray, ultrasound, histology   the background's level, grain and colour
    plane     axial, coronal, sagittal                 the gradient's direction
    organ     brain, lung, liver, kidney, heart        the shape in the middle (ellipse, two ellipses, ...)
    lesions   0 to 3, all on the left or the right     small bright dots
    questions "What imaging modality is shown?", "Is this an axial image?", "Is there a lesion in the liver?",
              "How many lesions are visible?", "On which side is the lesion?", ... (answer_type closed for
              yes/no answers, else open; category: the fact asked about)

Layout, as the hub exports it (and as data.load, `datasets` and PathVQA's export read it):

    OUT/data/train-00000-of-00010.parquet ... validation-00000-of-00001.parquet, test-00000-of-00001.parquet
    columns: image {"bytes": PNG, "path": "img_000123.png"} (the datasets Image feature, its bytes repeated on
             every question of the image), question, answer, answer_type, category
    OUT/synth_pmc.json: the command, the counts per split and the seconds

    python bench/synth_pmc.py --out runs/synth_pmc                          # 200,000 rows: ~190k train
    python bench/synth_pmc.py --out runs/pmc_20k --rows 20000 --test_rows 2000 --val_rows 200

--rows counts every split; train is what --test_rows (default 5%) and --val_rows (1%) leave. Images are disjoint
across splits. Rows are drawn image by image and written shard by shard (~--shard_rows a file, row groups of
1,000), so memory stays flat at any --rows; the same --seed gives the same bytes. data/ is written under a
temporary name and renamed when complete; an existing OUT/data is never overwritten.
"""

import argparse
import io
import json
import math
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--out", required=True, help="folder to write (OUT/data/<split>-NNNNN-of-NNNNN.parquet)")
parser.add_argument("--rows", type=int, default=200000, help="questions in all splits together (PMC-VQA: 227k)")
parser.add_argument("--test_rows", type=int, default=None, help="questions in test (default: 5%% of --rows)")
parser.add_argument("--val_rows", type=int, default=None, help="questions in validation (default: 1%% of --rows)")
parser.add_argument("--images_per_row", type=float, default=0.66,
                    help="distinct images per question (PMC-VQA: 149k / 227k = 0.66)")
parser.add_argument("--shard_rows", type=int, default=20000, help="questions per parquet file, about")
parser.add_argument("--seed", type=int, default=0, help="every image and question (same seed, same bytes)")

ROW_GROUP = 1000  # rows buffered before a write: what bounds memory
SPLIT_FILES = {"train": "train", "val": "validation", "test": "test"}  # the hub's file names
MODALITIES = {  # answer -> (how a question names it, background level, grain, RGB tint or None)
    "ct": ("CT", 25, 6, None), "mri": ("MRI", 70, 10, None), "x-ray": ("X-ray", 110, 4, None),
    "ultrasound": ("ultrasound", 15, 22, None), "histology": ("histology", 150, 8, (1.0, 0.6, 0.85))}
PLANES = ["axial", "coronal", "sagittal"]
ORGANS = ["brain", "lung", "liver", "kidney", "heart"]
COUNTS = ["0", "1", "2", "3"]
# the features `datasets` reads back (image: the Image feature, not a plain struct), as its parquet writer stores them
FEATURES = {"image": {"_type": "Image"}, **{c: {"dtype": "string", "_type": "Value"}
                                          for c in ("question", "answer", "answer_type", "category")}}


# -----------------------------------------------------------------------------
# one image: its facts, its pixels, its questions

def pick(rng, options):
    return options[int(rng.integers(len(options)))]


def facts(rng):
    lesions = 0 if rng.random() < 0.5 else int(rng.integers(1, 4))  # half the images are abnormal
    return {"modality": pick(rng, list(MODALITIES)), "plane": pick(rng, PLANES), "organ": pick(rng, ORGANS),
            "lesions": lesions, "side": pick(rng, ["left", "right"])}


def draw(f, rng):
    """PNG bytes of an image showing facts f: a gradient (plane), the organ's shape, the lesions, grain."""
    from PIL import Image, ImageDraw
    side = int(rng.integers(48, 97))
    _, level, grain, tint = MODALITIES[f["modality"]]
    canvas = Image.new("L", (side, side), 0)
    pen = ImageDraw.Draw(canvas)
    c, r = side / 2 + rng.uniform(-3, 3, 2), side * rng.uniform(0.22, 0.3)  # centre (x, y), half-size
    box = [c[0] - r, c[1] - r * 0.8, c[0] + r, c[1] + r * 0.8]
    if f["organ"] == "brain":
        pen.ellipse(box, fill=90)
    elif f["organ"] == "lung":  # two lobes
        pen.ellipse([box[0] - 2, box[1], c[0] - 2, box[3]], fill=90)
        pen.ellipse([c[0] + 2, box[1], box[2] + 2, box[3]], fill=90)
    elif f["organ"] == "liver":
        pen.rectangle(box, fill=90)
    elif f["organ"] == "kidney":
        pen.polygon([(c[0], box[1]), (box[2], box[3]), (box[0], box[3])], fill=90)
    else:  # heart: a ring
        pen.ellipse(box, outline=90, width=max(3, side // 16))
    for _ in range(f["lesions"]):  # bright dots, all on one side of the image
        x = side * (rng.uniform(0.12, 0.42) if f["side"] == "left" else rng.uniform(0.58, 0.88))
        y, d = side * rng.uniform(0.2, 0.8), rng.uniform(1.5, max(2.0, side / 24))
        pen.ellipse([x - d, y - d, x + d, y + d], fill=160)
    ramp = np.linspace(0, 40, side, dtype=np.float32)
    gradient = {"axial": ramp[None, :], "coronal": ramp[:, None], "sagittal": (ramp[None, :] + ramp[:, None]) / 2}
    pixels = level + gradient[f["plane"]] + np.asarray(canvas, np.float32)  # (side, side)
    n = (side + 1) // 2  # grain in 2 x 2 blocks: PNG keeps it in ~half the bytes of per-pixel noise
    pixels += rng.integers(0, grain + 1, (n, n), dtype=np.uint8).repeat(2, 0).repeat(2, 1)[:side, :side]
    if tint:  # histology: a pink-purple stain, RGB
        pixels = pixels[:, :, None] * np.array(tint, np.float32)  # (side, side, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def questions(f, k, rng):
    """k questions about facts f, each on a different fact: [(category, question, answer)]. Modality, plane and
    organ are asked open ("Which organ is shown?") or closed ("Does this image show the liver?", naming the truth
    half the time); abnormality is always closed, count and position always open."""
    categories = ["modality", "plane", "organ", "abnormality", "count"] + (["position"] if f["lesions"] else [])
    out = []
    for c in [categories[i] for i in sorted(rng.choice(len(categories), size=min(k, len(categories)), replace=False))]:
        if c in ("modality", "plane", "organ"):
            options = {"modality": list(MODALITIES), "plane": PLANES, "organ": ORGANS}[c]
            if rng.random() < 0.5:
                question = pick(rng, {"modality": ["What imaging modality is shown?", "What type of image is this?",
                                                   "Which imaging technique was used?"],
                                      "plane": ["In which plane is this image?", "What plane is shown?"],
                                      "organ": ["Which organ is shown?", "What organ is visible in this image?"]}[c])
                out.append((c, question, f[c]))
                continue
            shown = f[c] if rng.random() < 0.5 else pick(rng, [o for o in options if o != f[c]])
            if c == "modality":
                question = f"Is this {'an' if shown in ('mri', 'x-ray', 'ultrasound') else 'a'} " \
                           f"{MODALITIES[shown][0]} image?"
            else:
                question = f"Was this image taken in the {shown} plane?" if c == "plane" else \
                    f"Does this image show the {shown}?"
            out.append((c, question, "yes" if shown == f[c] else "no"))
        elif c == "abnormality":
            if rng.random() < 0.3:  # the negated form: a model must read the question too
                out.append((c, f"Is the {f['organ']} normal?", "no" if f["lesions"] else "yes"))
            else:
                question = pick(rng, [f"Is there a lesion in the {f['organ']}?", "Is there an abnormality in this "
                                      "image?"])
                out.append((c, question, "yes" if f["lesions"] else "no"))
        elif c == "count":
            question = pick(rng, ["How many lesions are visible?", f"How many lesions are seen in the {f['organ']}?"])
            out.append((c, question, COUNTS[f["lesions"]]))
        else:
            out.append((c, "On which side of the image is the lesion?", f["side"]))
    return out


def split_rows(split, n_rows, first_image, args):
    """The rows of one split, image by image: (first_image + i) is the image's number, its path and its RNG's
    seed, so a split's images are its own and any row is the same whatever else is drawn."""
    n_images = min(n_rows, max(1, round(n_rows * args.images_per_row)))
    for i in range(n_images):
        k = (i + 1) * n_rows // n_images - i * n_rows // n_images  # questions on image i: 1 or 2, spread evenly
        image = first_image + i
        rng = np.random.default_rng([args.seed, image])
        f = facts(rng)
        png = {"bytes": draw(f, rng), "path": f"img_{image:06d}.png"}
        for category, question, answer in questions(f, k, rng):
            yield {"image": png, "question": question, "answer": answer,
                   "answer_type": "closed" if answer in ("yes", "no") else "open", "category": category}


# -----------------------------------------------------------------------------
# writing: shard by shard, a row group at a time

def write_split(rows, n_rows, folder, name, shard_rows):
    """Writes the n_rows of generator `rows` as NAME-0000i-of-0000N.parquet files; returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))] +
                       [(c, pa.string()) for c in ("question", "answer", "answer_type", "category")],
                       metadata={"huggingface": json.dumps({"info": {"features": FEATURES}})})
    n_shards = max(1, math.ceil(n_rows / shard_rows))
    paths = []
    for s in range(n_shards):
        paths.append(os.path.join(folder, f"{name}-{s:05d}-of-{n_shards:05d}.parquet"))
        left = (s + 1) * n_rows // n_shards - s * n_rows // n_shards  # rows in this shard
        with pq.ParquetWriter(paths[-1], schema) as writer:
            while left:
                batch = [next(rows) for _ in range(min(ROW_GROUP, left))]
                writer.write_table(pa.Table.from_pylist(batch, schema=schema), row_group_size=ROW_GROUP)
                left -= len(batch)
    return paths


def main(args):
    t0 = time.time()
    sizes = {"test": round(0.05 * args.rows) if args.test_rows is None else args.test_rows,
             "val": round(0.01 * args.rows) if args.val_rows is None else args.val_rows}
    sizes = {"train": args.rows - sizes["test"] - sizes["val"], **sizes}
    if min(sizes.values()) < 1:
        raise SystemExit(f"error: every split needs a row: {sizes} (--rows, --test_rows, --val_rows)")
    final, tmp = os.path.join(args.out, "data"), os.path.join(args.out, "data.partial")
    if os.path.exists(final):
        raise SystemExit(f"error: {final} exists (delete it, or pick another --out)")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed run's leftovers
    os.makedirs(tmp)
    report, first_image = {}, 0
    for split, n_rows in sizes.items():
        t = time.time()
        rows = split_rows(split, n_rows, first_image, args)
        paths = write_split(rows, n_rows, tmp, SPLIT_FILES[split], args.shard_rows)
        n_images = min(n_rows, max(1, round(n_rows * args.images_per_row)))
        first_image += n_images
        mb = sum(os.path.getsize(p) for p in paths) / 2 ** 20
        report[split] = {"rows": n_rows, "images": n_images, "files": len(paths), "mb": round(mb, 1),
                         "seconds": round(time.time() - t, 1)}
        print(f"{split}: {n_rows} questions on {n_images} images, {len(paths)} file(s), {mb:.1f} MB, "
              f"{time.time() - t:.1f} s", flush=True)
    os.replace(tmp, final)
    seconds = time.time() - t0
    command = " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:])
    with open(os.path.join(args.out, "synth_pmc.json"), "w") as f:
        json.dump({"command": command, "args": {k: v for k, v in vars(args).items() if k != "out"},
                   "splits": report, "seconds": round(seconds, 1)}, f, indent=1)
    print(f"wrote {args.rows} questions on {first_image} images to {final} in {seconds:.1f} s "
          f"({args.rows / seconds:.0f} rows/s)")


if __name__ == "__main__":
    main(parser.parse_args())
