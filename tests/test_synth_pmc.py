"""bench/synth_pmc.py: a few hundred rows in the hub's parquet layout, the counts per split and per shard as asked,
the same bytes for the same seed, small images that decode and show what their answers say, images disjoint across
splits, and data.load and `datasets` read the set."""

import collections
import glob
import io
import os
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import synth_pmc  # noqa: E402

ARGS = ["--rows", "300", "--test_rows", "40", "--val_rows", "12", "--shard_rows", "100"]  # train: 248 rows, 3 files


def make(folder, *extra):
    synth_pmc.main(synth_pmc.parser.parse_args(["--out", str(folder)] + ARGS + list(extra)))
    return folder


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return make(tmp_path_factory.mktemp("pmc"))


def records(folder, name):
    files = sorted(glob.glob(os.path.join(folder, "data", f"{name}-*.parquet")))
    return files, [r for f in files for r in pq.read_table(f).to_pylist()]


def test_counts_per_split_and_shard(made):
    files, train = records(made, "train")
    assert [os.path.basename(f) for f in files] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [82, 83, 83]  # 248 rows spread evenly
    sizes = {name: len(records(made, name)[1]) for name in ("train", "validation", "test")}
    assert sizes == {"train": 248, "validation": 12, "test": 40}
    assert len({r["image"]["path"] for r in train}) == round(248 * 0.66)  # 164 images, 1 or 2 questions each
    assert set(collections.Counter(r["image"]["path"] for r in train).values()) == {1, 2}
    assert sorted(os.listdir(made)) == ["data", "synth_pmc.json"]  # data.partial renamed once complete


def test_same_seed_same_bytes_other_seed_other_bytes(made, tmp_path):
    again, other = make(tmp_path / "again"), make(tmp_path / "other", "--seed", "1")
    names = sorted(os.listdir(os.path.join(made, "data")))
    read = lambda folder, n: open(os.path.join(folder, "data", n), "rb").read()  # noqa: E731
    assert names == sorted(os.listdir(os.path.join(again, "data")))
    assert all(read(made, n) == read(again, n) for n in names)
    assert all(read(made, n) != read(other, n) for n in names)
    with pytest.raises(SystemExit, match="exists"):  # never written over
        make(again)


def test_images_are_small_disjoint_across_splits_and_show_their_answers(made):
    by_split = {name: records(made, name)[1] for name in ("train", "validation", "test")}
    paths = {name: {r["image"]["path"] for r in rs} for name, rs in by_split.items()}
    blobs = {name: {r["image"]["bytes"] for r in rs} for name, rs in by_split.items()}
    for a, b in (("train", "test"), ("train", "validation"), ("validation", "test")):
        assert not paths[a] & paths[b] and not blobs[a] & blobs[b]
    lesions_seen = set()
    for r in [r for rs in by_split.values() for r in rs]:
        assert len(r["image"]["bytes"]) < 10_000
        im = Image.open(io.BytesIO(r["image"]["bytes"]))
        assert im.format == "PNG" and 48 <= im.width == im.height <= 96
        assert r["answer_type"] == ("closed" if r["answer"] in ("yes", "no") else "open")
        # the facts the image was drawn from, redrawn from its number: the answers say them
        f = synth_pmc.facts(np.random.default_rng([0, int(r["image"]["path"][4:10])]))
        if r["answer_type"] == "open":
            assert r["answer"] == {"modality": f["modality"], "plane": f["plane"], "organ": f["organ"],
                                   "count": str(f["lesions"]), "position": f["side"]}[r["category"]]
        elif r["category"] == "abnormality":
            assert r["answer"] == ("no" if f["lesions"] else "yes") if "normal?" in r["question"] else \
                ("yes" if f["lesions"] else "no")
        _, level, _, tint = synth_pmc.MODALITIES[f["modality"]]
        if tint is None:  # a grey image: a lesion is the only thing as bright as level + 160
            lesions_seen.add(f["lesions"] > 0)
            assert (np.asarray(im).max() >= min(255, level + 160)) == (f["lesions"] > 0)
    assert lesions_seen == {True, False}


def test_data_load_and_datasets_read_it(made):
    import datasets
    for split, n in (("train", 248), ("test", 40), ("val", 12)):
        rows = data.load(str(made), split)
        assert len(rows) == n
        assert rows[0]["answer_type"] in ("closed", "open") and rows[0]["category"]
        assert data.load_image(rows[n - 1]["image"]).mode == "RGB"
    schema = pq.read_schema(glob.glob(os.path.join(made, "data", "test-*.parquet"))[0])
    assert isinstance(datasets.Features.from_arrow_schema(schema)["image"], datasets.Image)
