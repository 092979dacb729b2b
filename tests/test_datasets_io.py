"""Rows in and out of Hugging Face `datasets`: Dataset / DatasetDict objects and save_to_disk folders read by
data.load, every field kept through parquet, to_dataset round trips, and embedded images held once."""
import gc
import io
import os
import tracemalloc

import numpy as np
import pytest
from PIL import Image

import data
from data import DataError, SplitNotFound

datasets = pytest.importorskip("datasets")
pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")


def pixels(row):
    return np.asarray(data.load_image(row))


def assert_same_rows(a_rows, b_rows):
    assert [r["id"] for r in a_rows] == [r["id"] for r in b_rows]
    for a, b in zip(a_rows, b_rows):
        assert set(a) == set(b), a["id"]
        assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
        assert np.array_equal(pixels(a), pixels(b)), a["id"]


@pytest.fixture(scope="module")
def pseudo(tmp_path_factory):
    """A real pseudo-label file (retrieve.py on 12 demo rows), as load() reads it."""
    import retrieve
    path = str(tmp_path_factory.mktemp("pseudo") / "pseudo.jsonl")
    retrieve.main(retrieve.get_args(["--data", "demo", "--split", "train", "--limit", "12", "--out", path]))
    rows = list(data.load(path, "train"))  # a list, to edit a row
    rows[3] = dict(rows[3], report=None, category=None, keywords=[])  # fields a real dataset may lack
    return rows


def test_pseudo_labels_round_trip_through_to_dataset_and_parquet(pseudo, tmp_path):
    fields = {"target", "evidence_ids", "keywords", "report", "category", "writer", "source"}
    assert fields <= set(pseudo[0])
    ds = data.to_dataset(pseudo)
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["keywords"] == datasets.List(datasets.Value("string"))
    with open(pseudo[0]["image"], "rb") as f:  # the file's own bytes are embedded, not a re-encoding
        assert ds.cast_column("image", datasets.Image(decode=False))[0]["image"]["bytes"] == f.read()
    # one file given by name, and the hub layout (data/<split>-....parquet)
    ds.to_parquet(str(tmp_path / "pseudo.parquet"))
    os.makedirs(tmp_path / "hub" / "data")
    ds.to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    for source in (tmp_path / "pseudo.parquet", tmp_path / "hub"):
        back = data.load(source, "train")
        assert_same_rows(pseudo, back)
    # and again: the loaded rows (images now embedded bytes) make the same dataset
    assert_same_rows(pseudo, data.load(data.to_dataset(back), "train"))


def test_dataset_objects_and_save_to_disk_folders(pseudo, tmp_path):
    train, val = pseudo[:8], [dict(r, split="val") for r in pseudo[8:]]
    ds = data.to_dataset(train + val)  # one Dataset, rows of two splits: each row's split field decides
    assert_same_rows(train, data.load(ds, "train"))
    assert_same_rows(val, data.load(ds, "validation"))
    dd = datasets.DatasetDict({"train": data.to_dataset(train), "validation": data.to_dataset(val)})
    assert_same_rows(val, data.load(dd, "val"))
    ds.save_to_disk(str(tmp_path / "ds"))
    dd.save_to_disk(str(tmp_path / "dd"))
    assert_same_rows(train, data.load(tmp_path / "ds", "train"))
    assert_same_rows(val, data.load(str(tmp_path / "dd"), "validate"))
    with pytest.raises(SplitNotFound, match=r"no 'test' split \(it has train, validation\)"):
        data.load(dd, "test")
    # a Dataset from elsewhere: decoded images, no split or id columns, a question-only column set
    plain = datasets.Dataset.from_list([{"image": Image.new("RGB", (8, 8), (i, 0, 0)), "question": f"q{i}?",
                                         "answer": "yes" if i else "no"} for i in range(3)])
    rows = data.load(plain, "test")
    assert [r["answer_type"] for r in rows] == ["closed"] * 3 and rows[2]["split"] == "test"
    assert pixels(rows[2])[0, 0].tolist() == [2, 0, 0]
    assert len({r["id"] for r in rows}) == 3
    with pytest.raises(DataError, match="not a dataset"):
        data.load(["not", "a", "dataset"], "train")


def test_embedded_images_stay_in_the_mapped_cache_not_in_memory(tmp_path):
    """PathVQA's parquet repeats an image's bytes on every question of it: the loaded rows hold none of them
    in Python memory (the row cache is an Arrow file, read a batch at a time), and a second load opens the same file."""
    rng = np.random.default_rng(0)
    images = []
    for _ in range(10):  # noise: PNG cannot compress it, ~49 kB each
        buf = io.BytesIO()
        Image.fromarray((rng.random((128, 128, 3)) * 255).astype("uint8")).save(buf, format="PNG")
        images.append(buf.getvalue())
    records = [{"image": {"bytes": images[i % 10], "path": None}, "question": f"Question {i}?", "answer": "yes"}
               for i in range(400)]
    os.makedirs(tmp_path / "data")
    pq.write_table(pa.Table.from_pylist(records), str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    del records
    gc.collect()
    tracemalloc.start()
    try:
        rows = data.load(tmp_path, "train")
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(rows) == 400 and len({r["id"] for r in rows}) == 400
    one_copy = 400 * len(images[0])  # ~20 MB: what the rows held as Python bytes, one per row
    assert held < one_copy / 10, f"{held / 1e6:.1f} MB held for {one_copy / 1e6:.1f} MB of rows' images"
    assert {data.image_key(r["image"]) for r in rows} == {data.image_key(rows[i]["image"]) for i in range(10)}
    again = data.load(tmp_path, "train")
    assert again.path == rows.path and again[390]["image"].info["medfact_bytes"] == images[0]
    assert np.array_equal(pixels(rows[10]), np.asarray(Image.open(io.BytesIO(images[0])).convert("RGB")))
