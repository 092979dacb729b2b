"""
bench/fake_pathvqa.py: a PathVQA-sized dataset in the Hugging Face parquet layout, to check that
bench/benchmarks.sh fits a large benchmark's time and memory on this machine.

PathVQA (train 19,654 / val 6,259 / test 6,719 questions on ~5,000 pathology images, half of them
yes/no) is not on this machine and cannot be downloaded. This builds a stand-in of the same size
and layout from images that are here (SLAKE's and VQA-RAD's, under ../shared/data): each distinct
image is a crop of one of them (a different crop per image, re-encoded as JPEG at 768 px, about the
size of PathVQA's), and each question is one of the source's questions about that image, with its
answer. Its accuracy means nothing; its size, layout and image bytes are what a PathVQA run meets:

    data/train-00000-of-00001.parquet, data/validation-..., data/test-...
    columns: image {"bytes", "path"}, question, answer   (image bytes repeated on every question)

    python bench/fake_pathvqa.py --out runs/fake_pathvqa            # ~1 min, ~1 GB
    bash bench/benchmarks.sh --data runs/fake_pathvqa --name fake_pathvqa --seeds 0 \\
        --results runs/fake_pathvqa_results.json
"""

import argparse
import io
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {"train": (2600, 20000), "validation": (1200, 6000), "test": (1200, 7000)}  # (images, questions)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write (data/<split>-00000-of-00001.parquet)")
    parser.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"),
                        help="folder with slake/ and vqa_rad/ (the source images and questions)")
    parser.add_argument("--side", type=int, default=768, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    import data
    rng = random.Random(args.seed)
    rows = (data.load(os.path.join(args.data, "slake"), "train") + data.load(os.path.join(args.data, "slake"), "val")
            + data.load(os.path.join(args.data, "slake"), "test") + data.load(os.path.join(args.data, "vqa_rad"), "test")
            + data.load(os.path.join(args.data, "vqa_rad"), "train"))
    by_image = {}
    for r in rows:
        by_image.setdefault(r["image"], []).append(r)
    sources = sorted(by_image)
    os.makedirs(os.path.join(args.out, "data"), exist_ok=True)
    for split, (n_images, n_questions) in SIZES.items():
        images = []
        for i in range(n_images):  # a distinct crop of a source image per fake image
            src = rng.choice(sources)
            with Image.open(src) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = rng.uniform(0.7, 1.0)
                cw, ch = int(w * s), int(h * s)
                x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
                crop = im.crop((x, y, x + cw, y + ch)).resize((args.side, args.side))
            buf = io.BytesIO()
            crop.save(buf, format="JPEG", quality=90)
            images.append((src, buf.getvalue()))
        table = {"image": [], "question": [], "answer": []}
        for q in range(n_questions):
            src, raw = images[q % n_images]
            r = rng.choice(by_image[src])
            table["image"].append({"bytes": raw, "path": None})
            table["question"].append(r["question"])
            table["answer"].append(r["answer"])
        path = os.path.join(args.out, "data", f"{split}-00000-of-00001.parquet")
        pq.write_table(pa.table(table), path, row_group_size=500)
        print(f"{path}: {n_questions} questions on {n_images} images, {os.path.getsize(path) / 2**20:.0f} MB")


if __name__ == "__main__":
    main()
