"""data.load's rows at any size (issue #35): Rows over an Arrow row cache, built once per source and
read by every later load or process; header-only checks with cached token counts; the streaming reader."""
import json
import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_rows(folder, n=50, name="rows.jsonl", question="Is there an effusion?"):
    os.makedirs(folder / "imgs", exist_ok=True)
    for k in range(5):
        Image.fromarray(np.full((16 + 4 * k, 20, 3), 40 * k, dtype=np.uint8)).save(folder / "imgs" / f"{k}.png")
    rows = [{"id": f"r{i}", "image": f"imgs/{i % 5}.png", "question": f"{question} ({i})",
             "answer": "yes" if i % 2 else "no", "answer_type": "closed", "extra_field": {"n": i}} for i in range(n)]
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rows_read_as_the_documented_dicts_and_index_like_a_list(tmp_path):
    path = write_rows(tmp_path)
    rows = data.load(path, "train")
    assert isinstance(rows, data.Rows) and len(rows) == 50
    r = rows[7]
    assert r["id"] == "r7" and r["image"].endswith("imgs/2.png") and r["answer"] == "yes"
    assert r["keywords"] == [] and r["report"] is None and r["extra_field"] == {"n": 7}  # every field travels
    assert [x["id"] for x in rows[45:]] == ["r45", "r46", "r47", "r48", "r49"] and rows[-1]["id"] == "r49"
    assert [x["id"] for x in rows[::20]] == ["r0", "r20", "r40"]
    picked = rows.select([3, 1, 3])
    assert [x["id"] for x in picked] == ["r3", "r1", "r3"] and picked[1:][0]["id"] == "r1"
    assert [x["id"] for x in rows[:2] + rows[48:]] == ["r0", "r1", "r48", "r49"]  # ascending: read from the file
    assert [x["id"] for x in rows.select([1, 5, 5, 49])] == ["r1", "r5", "r5", "r49"]
    assert [x["id"] for b in rows.select(range(0, 50, 7)).batches(size=3) for x in b] == [f"r{i}" for i in range(0, 50, 7)]
    r["answer"] = "edited"
    assert rows[7]["answer"] == "yes"  # a row is a fresh dict: editing it edits nothing else
    assert rows.column("id")[:3] == ["r0", "r1", "r2"] and list(rows.only("id", "answer"))[1] == {"id": "r1",
                                                                                                  "answer": "yes"}
    assert rows == list(data.stream(path, "train"))  # the streaming reader gives the same rows, checked alike
    with pytest.raises(IndexError):
        rows[50]


def test_a_second_load_maps_the_cache_and_a_changed_file_rebuilds_it(tmp_path, monkeypatch):
    path = write_rows(tmp_path)
    first = data.load(path, "train")
    built = []
    real = data._write
    monkeypatch.setattr(data, "_write", lambda *a: built.append(1) or real(*a))
    again = data.load(path, "train")
    assert built == [] and again.path == first.path and again == first  # read from the cache, not rebuilt
    assert data.load(path, "train", limit=10).path != first.path  # other options: another cache file
    assert built == [1]
    with open(path, "a") as f:  # the source changed: its cache is rebuilt
        f.write(json.dumps({"id": "r50", "image": "imgs/0.png", "question": "Q?", "answer": "no"}) + "\n")
    changed = data.load(path, "train")
    assert len(built) == 2 and changed.path != first.path and len(changed) == 51


def _load_in_child(path, queue):
    rows = data.load(path, "train")
    queue.put((rows.path, len(rows)))


def test_two_processes_loading_at_once_build_one_cache(tmp_path):
    path = write_rows(tmp_path, n=400)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(path, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    assert got[0] == got[1] and got[0][1] == 400  # the same file: one built it under the lock, one mapped it
    arrows = [f for f in os.listdir(os.path.dirname(got[0][0])) if f.endswith(".arrow")]
    assert arrows.count(os.path.basename(got[0][0])) == 1


def test_check_rows_reads_headers_and_caches_its_token_counts(tmp_path, monkeypatch):
    import model as M
    vlm = M.load("tiny", texts=data.tokenizer_texts)
    path = write_rows(tmp_path, n=30)
    (tmp_path / "imgs" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a header that does not read
    rows = data.load(path, "train")
    with pytest.raises(data.DataError, match=r"2\.png \(row r2\): cannot decode image"):
        data.check_rows(vlm, rows)
    calls = []
    real = vlm.prompt_length
    monkeypatch.setattr(vlm, "prompt_length", lambda *a, **k: calls.append(1) or real(*a, **k))
    good = data.check_rows(vlm, rows, skip_bad_rows=True)
    assert isinstance(good, data.Rows) and len(good) == 24 and "r2" not in good.column("id")
    assert calls == []  # the counts of the first check were cached beside the rows
    lengths = [real((16 + 4 * (int(r["id"][1:]) % 5), 20)[::-1], r["question"])[0] for r in good]
    assert lengths == [M.VLM.prompt_length(vlm, Image.open(r["image"]), r["question"])[0] for r in good]
    assert data.check_rows(vlm, list(good)) == list(good)  # a list of row dicts: checked alike, a list back


def test_the_cache_holds_embedded_images_as_bytes_and_reads_their_size(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import io
    images = []
    for k in range(3):
        buf = io.BytesIO()
        Image.fromarray(np.full((10 + k, 7, 3), 50 * k, dtype=np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    os.makedirs(tmp_path / "data")
    pq.write_table(pa.Table.from_pylist([{"image": {"bytes": images[i % 3], "path": None}, "question": f"q{i}?",
                                           "answer": "yes"} for i in range(9)]),
                   str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    rows = data.load(str(tmp_path), "train")
    sizes = [(w, h) for batch in rows.batches(["width", "height"]) for w, h in ((r["width"], r["height"])
                                                                               for r in batch)]
    assert sizes == [(7, 10 + i % 3) for i in range(9)]
    assert rows[4]["image"].info["medfact_bytes"] == images[1] and data.load_image(rows[4]).size == (7, 11)


def test_a_bad_row_is_named_at_any_size(tmp_path):
    path = write_rows(tmp_path, n=3000)
    lines = open(path).read().splitlines()
    lines[2718] = json.dumps({"id": "r2718", "image": "imgs/0.png", "question": "", "answer": "no"})
    open(path, "w").write("\n".join(lines) + "\n")
    with pytest.raises(data.DataError, match=r"rows\.jsonl: line 2719 \(id r2718\): empty question"):
        data.load(path, "train")
    out = subprocess.run([sys.executable, "-c", f"import data; print(len(data.load({path!r}, 'train', "
                          f"skip_bad_rows=True)))"], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "2999" and "skipped 1 bad rows" in out.stderr


def test_evaluate_streamed_gives_the_predictions_of_the_cached_rows(tmp_path):
    """evaluate.py --stream N reads the split N rows at a time without the row cache: the same predictions
    file and metrics as the cached run, byte for byte, with the rows' parts cut anywhere."""
    import evaluate
    path = write_rows(tmp_path, n=23)
    common = ["--ckpt", "tiny", "--data", path, "--split", "train", "--max_new_tokens", "4", "--batch_size", "4",
              "--no_baselines", "--quiet"]
    evaluate.main(evaluate.parser.parse_args(common + ["--out", str(tmp_path / "cached.json")]))
    evaluate.main(evaluate.parser.parse_args(common + ["--out", str(tmp_path / "streamed.json"), "--stream", "5"]))
    cached = (tmp_path / "cached.predictions.jsonl").read_bytes()
    assert cached.count(b"\n") == 23 and (tmp_path / "streamed.predictions.jsonl").read_bytes() == cached
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("cached", "streamed"))
    assert {k: v for k, v in a.items() if k not in ("seconds", "predictions")} == \
        {k: v for k, v in b.items() if k not in ("seconds", "predictions")}


def test_a_changed_source_replaces_its_cache_once_the_old_one_is_a_day_unused(tmp_path):
    path = write_rows(tmp_path)
    first = data.load(path, "train")
    with open(path, "a") as f:
        f.write(json.dumps({"id": "r50", "image": "imgs/0.png", "question": "Q?", "answer": "no"}) + "\n")
    second = data.load(path, "train")
    assert os.path.exists(first.path) and len(first) == 50  # used an hour ago, say: kept
    os.utime(first.path, (0, 0))  # now unused for a day and more
    with open(path, "a") as f:
        f.write(json.dumps({"id": "r51", "image": "imgs/0.png", "question": "Q?", "answer": "no"}) + "\n")
    third = data.load(path, "train")
    assert len(third) == 52 and not any(f.startswith(os.path.basename(first.path))
                                        for f in os.listdir(os.path.dirname(first.path)))
    assert os.path.exists(second.path) and data.load(path, "train", limit=3).path != third.path


def test_an_unwritable_cache_folder_builds_a_private_copy_and_says_so(tmp_path, monkeypatch, capsys):
    path = write_rows(tmp_path, n=5)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("MEDFACT_CACHE", str(blocker))
    rows = data.load(path, "train")
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(5)] and not rows.path.startswith(str(blocker))
    assert "not writable" in capsys.readouterr().err
