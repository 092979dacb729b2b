"""
sources.py: where rows come from: each dataset's files in its original layout, read as rows in data.py's
schema, one at a time (a generator of (file, where, row or what is wrong with it)); data.py checks them.

Local layouts recognised (a folder, or its parent where noted):
- VQA-RAD, OSF release: `VQA_RAD Dataset Public.json` + `VQA_RAD Image Folder/`. The
  official test split is phrase_type test_freeform + test_para (451 rows: 272 closed,
  179 open). VQA-RAD has no validation split, so we hold one out of train: "val" is the
  questions on a fixed tenth of the training images (VAL_IMAGES: a hash of the image file
  name, 196 questions on 35 images), "train" the rest (1,601). Settings are chosen on val
  without touching test, and val's images are disjoint from train's (while 446 of the 451
  test questions are on training images).
- VQA-RAD, MEVF split files: `data_RAD/` (or its parent, when no OSF json is there)
  with trainset.json / testset.json; images from data_RAD/images/ or the sibling
  OSF image folder. Train has 1,267 extra "frame" questions (3,064 rows); val is held
  out of it as for the OSF release.
- SLAKE 1.0: `Slake1.0/` (or its parent) with train/validate/test.json and imgs/.
  `lang` filters q_lang: "en", "zh" or "all". Evaluate per language: the splits are
  image-disjoint within a language but not across languages.
- PathVQA as the Hugging Face parquet export: `data/*.parquet` or `*.parquet`, one or
  more files per split named `<split>-....parquet`, image bytes inside.
- Any folder with `<split>.jsonl` or `<split>.json` rows (image paths relative to it).
- A `Dataset.save_to_disk` / `DatasetDict.save_to_disk` folder.

From parquet and `datasets` every field of a row is kept (a pseudo-label's target, evidence, ...),
as from JSONL; in one file or one Dataset a row's `split` field says which split it is in (as in
JSONL), in split-named files or a DatasetDict the container does. Embedded images are held once
per distinct image (PathVQA repeats each image's bytes on every question of it), and parquet is
read in batches.

Quirks of the official releases that the loaders absorb: VQA-RAD's answer_type
"CLOSED " (trailing space) and int answers (5 rows) become "closed" and str; its
question_type typos ATRIB/PRSE become ATTRIB/PRES. SLAKE train row qid 1622 ("Does the
picture contain liver?") has an empty answer: a known-bad row of an official release
is dropped with a one-line note on stderr, so load("slake", "train") gives 4,918
English rows, not 4,919. A bad row that is NOT on that known list (a corrupted copy,
a user's JSONL) raises DataError, unless skip_bad_rows=True, which skips it and
prints one summary line. For PathVQA (and any source without an answer type)
a row is closed when its normalised answer is yes or no.

To add a dataset, write a generator of rows (see _load_slake) and a branch in detect().
"""

import glob
import hashlib
import itertools
import math
import os

from files import DataError, SplitNotFound, iter_jsonl, read_json, short, text_problem
from images import image_from_bytes
from rewards import normalize_answer


SPLITS = {"train": "train", "val": "val", "validation": "val", "validate": "val", "test": "test"}
HUB = {"vqa-rad": "flaviagiammarino/vqa-rad", "slake": "BoKelvin/SLAKE", "pathvqa": "flaviagiammarino/path-vqa"}
LOCAL_NAMES = {"vqa-rad": "vqa_rad", "slake": "slake", "pathvqa": "pathvqa"}  # folders under $MEDFACT_DATA_DIR


def detect(path, split, lang, dataset=None):
    """Recognise a local dataset layout; returns (a name for messages, a generator of rows)."""
    if os.path.isfile(path):
        if path.endswith((".jsonl", ".json")):
            return path, _load_rows_file(path, split, lang, dataset)
        if path.endswith(".parquet"):  # one file: its rows carry their split, or belong to every split
            return path, _load_parquet([path], split, lang, dataset or _folder_name(path).rsplit(".", 1)[0],
                                       by_file_name=False)
        raise DataError(f"{path}: not a dataset (expected a .jsonl, .json or .parquet file of rows, or a dataset "
                        f"folder)")
    if os.path.exists(os.path.join(path, VQA_RAD_JSON)):
        return os.path.join(path, VQA_RAD_JSON), _load_vqa_rad(path, split)
    for d in (path, os.path.join(path, "data_RAD")):
        if all(os.path.exists(os.path.join(d, f)) for f in MEVF_FILES.values()):
            return d, _load_mevf(d, split)
    for d in (path, os.path.join(path, "Slake1.0")):
        if os.path.isdir(os.path.join(d, "imgs")) and any(
                os.path.exists(os.path.join(d, f)) for fs in SLAKE_FILES.values() for f in fs):
            return d, _load_slake(d, split, lang)
    if os.path.exists(os.path.join(path, "dataset_dict.json")) or all(
            os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "state.json")):
        import datasets  # a Dataset.save_to_disk / DatasetDict.save_to_disk folder
        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:  # a broken save_to_disk folder
            raise DataError(f"{path}: not a readable save_to_disk folder ({type(e).__name__}: {e})") from None
        return path, datasets_rows(ds, split, lang, path, dataset or _folder_name(path))
    parquets = sorted(glob.glob(os.path.join(path, "data", "*.parquet")) + glob.glob(os.path.join(path, "*.parquet")))
    if parquets:
        return path, _load_parquet(parquets, split, lang, dataset or _folder_name(path))
    for name in [k for k, v in SPLITS.items() if v == split]:
        for ext in (".jsonl", ".json"):
            f = os.path.join(path, name + ext)
            if os.path.exists(f):
                return f, _load_rows_file(f, split, lang, dataset or _folder_name(path))
    raise SplitNotFound(f"{path}: no known dataset layout for split {split!r} (looked for VQA-RAD, MEVF data_RAD, "
                        f"Slake1.0, a save_to_disk folder, *.parquet and <split>.jsonl/.json)")


def _folder_name(path):
    return os.path.basename(os.path.normpath(path)).lower()


def _in(folder, name):
    # an image file name from a dataset's JSON, in its image folder; anything else stays as it is, for _problem
    return os.path.join(folder, name) if isinstance(name, str) and name else name or None


def _or(value, default):
    # a field that is missing or null: the default (r.get(key, default) keeps an explicit null)
    return default if value is None else value


# -----------------------------------------------------------------------------
# a row in the schema

def _row(id, image, question, answer, answer_type, dataset, split, lang="en", keywords=None,
         report=None, category=None):
    """A row in our schema from a source's fields. Values of the wrong type are kept as they are, for data.py's
    check to name; only what is unambiguous is converted: an integer or a finite number answer (VQA-RAD has int
    answers) or id becomes text; a missing or blank id is None (data.py makes one up)."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool) and math.isfinite(answer):
        answer = str(answer)
    answer = answer.strip() if isinstance(answer, str) else answer
    if isinstance(answer_type, str):
        answer_type = answer_type.strip().lower()
    elif answer_type is None and isinstance(answer, str) and answer:  # no type given: closed means a yes/no answer
        answer_type = "closed" if normalize_answer(answer) in ("yes", "no") else "open"
    if isinstance(id, int) and not isinstance(id, bool):
        id = str(id)
    if isinstance(id, str):
        id = id.strip() or None
    return {"id": id, "image": image, "question": question.strip() if isinstance(question, str) else question,
            "answer": answer, "answer_type": answer_type, "dataset": dataset, "split": split, "lang": lang,
            "keywords": keywords if keywords is not None else [], "report": report, "category": category}


# -----------------------------------------------------------------------------
# VQA-RAD: the OSF release and the MEVF split files

VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"
MEVF_FILES = {"train": "trainset.json", "test": "testset.json"}
VQA_RAD_TYPE_TYPOS = {"ATRIB": "ATTRIB", "PRSE": "PRES"}


def _vqa_rad_category(qtype):
    qtype = str(qtype or "").strip().upper()
    return VQA_RAD_TYPE_TYPOS.get(qtype, qtype) or None


# VQA-RAD's held-out validation images: a fixed tenth, by a hash of the file name (no RNG, no list to ship)
VAL_IMAGES = 0.1


def _held_out(image_name):
    return int(hashlib.sha1(os.path.basename(image_name).encode()).hexdigest(), 16) % 1000 < VAL_IMAGES * 1000


def _vqa_rad_rows(file, records, image_dir, split, id_prefix):
    """Rows of VQA-RAD's records; "train" and "val" split the training records by image (_held_out)."""
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            yield file, f"row {i}", "not a JSON object"
            continue
        if split in ("train", "val") and r.get("image_name") and _held_out(str(r["image_name"])) != (split == "val"):
            continue
        image = _in(image_dir, r.get("image_name"))
        yield file, f"row {i}", _row(f"{id_prefix}{_or(r.get('qid'), i)}", image, r.get("question"), r.get("answer"),
                                     r.get("answer_type"), "vqa-rad", split,
                                     category=_vqa_rad_category(r.get("question_type")))


def _load_vqa_rad(root, split):
    file = os.path.join(root, VQA_RAD_JSON)
    records = read_json(file)
    # the official test split is the phrase_type test_freeform + test_para rows; train and val the others
    keep = [r for r in records if not isinstance(r, dict) or
            str(r.get("phrase_type", "")).startswith("test") == (split == "test")]
    yield from _vqa_rad_rows(file, keep, os.path.join(root, VQA_RAD_IMAGES), split, "vqa-rad-")


def _load_mevf(root, split):
    file = os.path.join(root, MEVF_FILES["test" if split == "test" else "train"])  # val: held out of train
    image_dir = os.path.join(root, "images")
    if not os.path.isdir(image_dir):  # the split files alone, next to the OSF release's image folder
        image_dir = os.path.join(os.path.dirname(os.path.normpath(root)), VQA_RAD_IMAGES)
    yield from _vqa_rad_rows(file, read_json(file), image_dir, split, f"vqa-rad-mevf-{split}-")


# -----------------------------------------------------------------------------
# SLAKE 1.0

SLAKE_FILES = {"train": ["train.json"], "val": ["validate.json", "validation.json"], "test": ["test.json"]}


def _load_slake(root, split, lang):
    files = [os.path.join(root, f) for f in SLAKE_FILES[split] if os.path.exists(os.path.join(root, f))]
    if not files:
        raise SplitNotFound(f"{root}: SLAKE split file {SLAKE_FILES[split][0]} does not exist")
    file = files[0]
    for i, r in enumerate(read_json(file)):
        if not isinstance(r, dict):
            yield file, f"row {i}", "not a JSON object"
            continue
        if lang != "all" and r.get("q_lang") != lang:
            continue
        image = _in(os.path.join(root, "imgs"), r.get("img_name"))
        yield file, f"row {i}", _row(f"slake-{_or(r.get('qid'), i)}", image, r.get("question"), r.get("answer"),
                                     r.get("answer_type"), "slake", split, lang=r.get("q_lang", "en"),
                                     category=r.get("content_type"))


# -----------------------------------------------------------------------------
# PathVQA (Hugging Face parquet export), rows files, and the hub

def _load_parquet(files, split, lang, dataset, by_file_name=True):
    """Rows of parquet files (the Hugging Face export: `<split>-....parquet`, or one file given by name),
    read in batches: the whole table is never a Python list."""
    import pyarrow.parquet as pq  # a dependency of `datasets`
    if by_file_name:
        names = [k for k, v in SPLITS.items() if v == split]
        files = [f for f in files if os.path.basename(f).split("-")[0].split(".")[0] in names]
    counter = itertools.count()  # across the split's files: unique ids
    for file in files:
        try:  # the footer: a file that is not parquet, or was cut short, fails here
            table = pq.ParquetFile(file, pre_buffer=False, buffer_size=1 << 20)  # pre_buffer keeps every chunk read
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
            raise DataError(f"{file}: not a readable parquet file ({type(e).__name__}: {e})") from None
        batches = (b.to_pylist() for b in table.iter_batches(batch_size=512))
        yield from _table_rows(file, batches, split, lang, dataset, os.path.dirname(file), counter,
                               own_split=not by_file_name)


def datasets_name(ds):
    """A name for a datasets.Dataset / DatasetDict in messages."""
    name = getattr(getattr(ds, "info", None), "dataset_name", None)
    return f"<{type(ds).__module__.split('.')[0]}.{type(ds).__name__}{' ' + name if name else ''}>"


def datasets_rows(ds, split, lang, name, dataset=None):
    """Rows of a datasets.Dataset, or of one split of a DatasetDict (train / validation / val / test)."""
    import datasets
    whole = not isinstance(ds, datasets.DatasetDict)  # a Dataset: its rows' split field (if any) says which
    if not whole:
        keys = [k for k in ds if SPLITS.get(k) == split]
        if not keys:
            raise SplitNotFound(f"{name}: no {split!r} split (it has {', '.join(ds) or 'none'})")
        ds = ds[keys[0]]
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{name}: not a dataset (expected a name, a path, or a datasets.Dataset / DatasetDict)")
    if isinstance(ds.features.get("image"), datasets.Image):
        ds = ds.cast_column("image", datasets.Image(decode=False))  # the embedded bytes, not decoded pixels
    batches = (b.to_pylist() for b in ds.with_format("arrow").iter(batch_size=512))
    yield from _table_rows(name, batches, split, lang, dataset or ds.info.dataset_name or "dataset", None,
                           itertools.count(), own_split=whole)


def _table_rows(name, batches, split, lang, dataset, folder, counter, own_split):
    """Rows from batches of records (parquet, a datasets.Dataset), every field kept, as the JSONL reader keeps
    them. own_split: the records may be of several splits (one parquet file, one Dataset), so a record's split
    field says which, as in a JSONL file (a file named for a split, or a DatasetDict's split, says it for all).
    Embedded images stay bytes (their header read): data.py writes them to the row cache, never pixels."""
    i = -1
    for batch in batches:
        for r in batch:
            i += 1
            n = next(counter)
            row_lang, problem = _belongs(r, split, lang, own_split)  # another split's or language's: skipped
            if problem:
                yield name, f"row {i}", problem
            if not row_lang:
                continue
            image, problem = r.get("image"), None
            if isinstance(image, dict):  # the datasets Image feature: {"bytes": ..., "path": ...}
                if isinstance(image.get("bytes"), bytes) and image["bytes"]:
                    image, problem = image_from_bytes(image["bytes"], f"{name} row {i}")
                else:
                    image = image.get("path")
            if isinstance(image, str) and folder:  # a path, relative to the parquet file
                image = os.path.join(folder, image)
            if not isinstance(r.get("keywords") or [], list):
                problem = "keywords must be a list of strings"
            if problem:
                yield name, f"row {i}", problem
                continue
            row = _row(_or(r.get("id"), f"{dataset}-{split}-{n}"), image, r.get("question"), r.get("answer"),
                       r.get("answer_type"), r.get("dataset") or dataset, split, row_lang,
                       _or(r.get("keywords"), []), r.get("report"), r.get("category"))
            yield name, f"row {i}", {**r, **row}  # extra fields travel with the row: target, evidence, ...


def _belongs(r, split, lang, own_split=True):
    """(its lang, None) when record r belongs to the split and language asked for, (None, None) when it does
    not, (None, what is wrong) when its split or lang is not text or not a split name. A record without a
    split belongs to every split (own_split=False: the file's name said it); without a lang it is English."""
    row_split, row_lang = r.get("split") if own_split else None, _or(r.get("lang"), "en")
    problem = text_problem("split", row_split, optional=True) or text_problem("lang", row_lang)
    if problem:
        return None, problem
    row_lang = row_lang.strip().lower() or "en"  # "EN" is English too, not a language no one asked for
    if row_split is not None and row_split not in SPLITS:
        return None, f"unknown split {short(row_split)}"
    if (row_split is not None and SPLITS[row_split] != split) or (lang != "all" and row_lang != lang):
        return None, None
    return row_lang, None


def _load_rows_file(file, split, lang, dataset=None):
    """Rows in our schema, from a .jsonl (one object a line, iter_jsonl) or a .json list. Image paths are
    relative to the file.

    A row with a "split" field is kept only for that split; a row without one belongs to every split. A row
    without "lang" is English.
    """
    stem = os.path.splitext(os.path.basename(file))[0]
    if file.endswith(".jsonl"):
        items = ((f"line {n}", r, problem) for n, r, problem in iter_jsonl(file))  # a line at a time
    else:
        records = read_json(file)
        if not isinstance(records, list):
            raise DataError(f"{file}: row 0: expected a JSON list of rows, got {type(records).__name__}")
        items = [(f"row {i}", r, None) for i, r in enumerate(records)]
    for where, r, problem in items:
        if problem:
            yield file, where, problem
            continue
        if not isinstance(r, dict):
            yield file, where, f"not a JSON object but {type(r).__name__}"
            continue
        row_lang, problem = _belongs(r, split, lang)
        if problem:
            yield file, where, problem
        if not row_lang:
            continue
        image = r.get("image")
        if isinstance(image, str) and image:
            image = os.path.join(os.path.dirname(os.path.abspath(file)), image)  # unchanged if absolute
        row = _row(r.get("id"), image, r.get("question"), r.get("answer"), r.get("answer_type"),
                   _or(r.get("dataset"), dataset or stem), split, row_lang, _or(r.get("keywords"), []),
                   r.get("report"), r.get("category"))
        # extra fields travel with the row: a pseudo-label's target, evidence, writer
        yield file, where, {**r, **row}


def hub_rows(source, split, lang):
    """The hub copy. VQA-RAD and PathVQA come through `datasets` with images inside; SLAKE's hub repo is its
    original layout with the images zipped, so it is downloaded, unzipped once and read like a local copy.
    Untested offline (the test suite never touches the network)."""
    if source == "slake":
        from huggingface_hub import snapshot_download
        root = snapshot_download(HUB[source], repo_type="dataset")
        if not os.path.isdir(os.path.join(root, "imgs")):
            import zipfile
            with zipfile.ZipFile(os.path.join(root, "imgs.zip")) as z:
                z.extractall(root)
        yield from _load_slake(root, split, lang)
        return
    import datasets
    hub_split = {"train": "train", "val": "validation", "test": "test"}[split]
    if source == "vqa-rad" and split == "val":  # held out of train by image, as for a local copy (by its bytes)
        hub_split = "train"
    if lang not in ("en", "all"):
        return
    ds = datasets.load_dataset(HUB[source], split=hub_split).cast_column("image", datasets.Image(decode=False))
    for i, ex in enumerate(ds):
        if source == "vqa-rad" and split != "test" and _held_out(hashlib.sha1(ex["image"]["bytes"]).hexdigest()) \
                != (split == "val"):
            continue
        image, problem = image_from_bytes(ex["image"]["bytes"], f"{HUB[source]} {hub_split} row {i}")
        yield HUB[source], f"row {i}", problem or _row(f"{source}-{split}-{i}", image, ex.get("question"),
                                                       ex.get("answer"), None, source, split)
