"""
Every dataset medfact trains or evaluates on becomes the same list of row dicts:

    {"id": str, "image": str (path) or PIL.Image, "question": str, "answer": str,
     "answer_type": "closed" | "open", "dataset": str, "split": str, "lang": str,
     "keywords": [str], "report": str | None, "category": str | None}

`category` is our addition to the paper's row: the question category (the demo's
categories, SLAKE's content_type, VQA-RAD's question_type), so evaluate.py can
break accuracy down by it. Split names are "train", "val" and "test" ("validation"
and "validate" are accepted and mean "val").

    load("demo", "train")                  # the synthetic chest X-ray set (synthetic_cxr.py)
    load("vqa-rad", "test")                # $MEDFACT_DATA_DIR/vqa_rad if set, else the hub
    load("slake", "test", lang="zh")       # $MEDFACT_DATA_DIR/slake if set, else the hub
    load("pathvqa", "val")                 # $MEDFACT_DATA_DIR/pathvqa if set, else the hub
    load("path/to/Slake1.0", "train")      # a local copy in its original layout, auto-detected
    load("rows.jsonl", "train")            # rows in the schema above, one JSON object a line
    load("rows.parquet", "train")          # the same rows as parquet (e.g. to_dataset(rows).to_parquet(...))
    load(dataset_or_dict, "train")         # a datasets.Dataset / DatasetDict, or a save_to_disk folder
    to_dataset(rows)                       # rows (pseudo-labels too) -> a datasets.Dataset, images embedded

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

Every field a stage reads is checked at load time, for type and content: text is a str
(an integer or finite number answer becomes one; a list, a dict, a bool, NaN or a lone
surrogate is a bad row), keywords a list of str, split and lang text, a pseudo-label's target
text and its evidence a list of passages. Every row leaves with a unique id: one without an
id (missing, null, blank) gets FILE-N from its line or row number, a repeated one a suffix
(id#2); both depend on the data alone, so a rerun sees the same ids. Image paths must be
regular files (cheap); decoding waits for load_image(), which turns a corrupt file into a
DataError naming it and converts every mode to RGB as the model should see it (16-bit and
float images scaled by their bit depth, not clipped to white; see _rgb). A split that does
not exist, or holds no rows, raises SplitNotFound (a DataError), so a caller can tell "no
validation split" (carry on without it) from a bad row (stop).

One pair of functions writes and reads every JSONL file of the project (pseudo-labels,
metrics, rollouts, predictions, users' rows): jsonl_line / append_jsonl / write_jsonl and
read_jsonl. Lines end at "\n" only (never at U+2028, which JSON allows inside a string, and
which str.splitlines() breaks at); cut_torn_line and truncate_jsonl let a resumed run
tolerate a last line a crash or a full disk left half written. writable_file and
writable_folder check an --out before any work.

The demo (`load("demo", split)`) is the synthetic chest-radiograph set that synthetic_cxr.py
draws: a stand-in for MIMIC-CXR-VQA that a tiny model learns on a laptop CPU in minutes. Its
rows are in the schema above (with a report, keywords and a category); see that file.

check_rows(vlm, rows) is the second check, once a stage has its model: every image decodes,
the image processor's resize rule takes its size (it refuses an aspect ratio over 200), and
every prompt fits the model's context (with target=True, prompt and target). Each distinct
image is decoded once. Bad rows raise DataError (one line naming the row) or, with
skip_bad_rows, are skipped and counted. retrieve.py, which has no model, calls it with
vlm=None: the images decode.

Departures from the paper: MEDFACT-R1 trains on real data only and never released
its data code; the demo, the known-bad-row policy, the validation split names and
the `category` field are ours. To add a dataset, write a generator of rows (see
_load_slake) and a branch in _detect().
"""

import collections
import glob
import hashlib
import io
import itertools
import json
import math
import os
import re
import sys
import tempfile

import numpy as np
from PIL import Image

import synthetic_cxr
from rewards import normalize_answer  # ONE answer normalisation, shared with rewards and evaluation

__all__ = ["DataError", "SplitNotFound", "load", "load_image", "check_rows", "to_dataset", "normalize_answer",
           "jsonl_line", "append_jsonl", "write_jsonl", "read_jsonl", "cut_torn_line", "truncate_jsonl",
           "writable_file", "writable_folder", "image_key", "ImageCache"]


class DataError(ValueError):
    """Bad input: a row, a file or a path the user gave. The message is one line naming the file, the row and
    the problem (any line break in it, U+2028 included, becomes a space)."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).splitlines()))


class SplitNotFound(DataError):
    """The source has no such split, or no rows in it: unlike a bad row, something a caller may do without."""


# -----------------------------------------------------------------------------
# the entry point

SPLITS = {"train": "train", "val": "val", "validation": "val", "validate": "val", "test": "test"}
HUB = {"vqa-rad": "flaviagiammarino/vqa-rad", "slake": "BoKelvin/SLAKE", "pathvqa": "flaviagiammarino/path-vqa"}
LOCAL_NAMES = {"vqa-rad": "vqa_rad", "slake": "slake", "pathvqa": "pathvqa"}  # folders under $MEDFACT_DATA_DIR


def load(source, split, lang="en", skip_bad_rows=False, limit=None):
    """Rows of one split of `source`: "demo", a dataset name, a local folder, a .jsonl or .parquet file,
    or a datasets.Dataset / DatasetDict."""
    in_memory = not isinstance(source, (str, os.PathLike))  # a datasets object, not a name or a path
    name = _datasets_name(source) if in_memory else os.fspath(source)
    if split not in SPLITS:
        raise DataError(f"{name}: unknown split {split!r} (use train, val/validation/validate or test)")
    split = SPLITS[split]
    if in_memory:
        return _finish(_load_datasets(source, split, lang, name), name, split, lang, skip_bad_rows, limit)
    source = name
    if source == "demo":
        rows = [dict(r) for r in synthetic_cxr.rows(split) if lang in ("all", r["lang"])]  # copies: callers may edit
        if not rows:
            raise SplitNotFound(f"demo: no rows for split {split!r} and lang {lang!r}")
        return rows[:limit]
    path = source
    if source in HUB:
        data_dir = os.environ.get("MEDFACT_DATA_DIR")
        if not data_dir:
            return _finish(_load_hub(source, split, lang), HUB[source], split, lang, skip_bad_rows, limit)
        path = os.path.join(data_dir, LOCAL_NAMES[source])
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: dataset path does not exist")
    name, rows = _detect(path, split, lang, dataset=source if source in HUB else None)
    return _finish(rows, name, split, lang, skip_bad_rows, limit)


def tokenizer_texts():
    """What a model built from scratch (model.load("tiny"), "random:...") trains its tokenizer on when a stage
    has no texts of its own for it (evaluate.py or grpo.py with --ckpt tiny): the demo's questions, answers,
    reports and glossary (synthetic_cxr.tokenizer_texts). sft.py passes its pseudo-labels' instead."""
    return synthetic_cxr.tokenizer_texts()


def _detect(path, split, lang, dataset=None):
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
        return path, _load_datasets(ds, split, lang, path, dataset or _folder_name(path))
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
# rows: building, checking, and the one place bad rows are reported

def _row(id, image, question, answer, answer_type, dataset, split, lang="en", keywords=None,
         report=None, category=None):
    """A row in our schema from a source's fields. Values of the wrong type are kept as they are, for _problem
    to name; only what is unambiguous is converted: an integer or a finite number answer (VQA-RAD has int
    answers) or id becomes text; a missing or blank id is None (_finish makes one up)."""
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


def _short(value, n=60):
    """A value as it reads in a one-line error: repr, cut to about n characters."""
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def _text_problem(field, value, optional=False):
    """What is wrong with a text field (a str), or None. Text must be a str that UTF-8 can write: JSON's
    "\\ud800" escape makes a lone surrogate, which no tokenizer and no file write accepts."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        return f"{field} must be text, not {type(value).__name__} {_short(value)}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{field} is not valid Unicode (a lone surrogate, as JSON's \\ud800 escape makes)"
    return None


def _problem(row, exists):
    """What is wrong with a row (a str), or None: every field a stage reads, its type and its content.
    `exists` caches os.path.isfile per image path."""
    for field in ("image", "question", "answer"):
        if row.get(field) is None:
            return f"missing field {field!r}"
    if not isinstance(row["id"], str):
        return f"id must be text or an integer, not {type(row['id']).__name__} {_short(row['id'])}"
    for field, optional in (("id", False), ("question", False), ("answer", False), ("dataset", False),
                            ("split", False), ("lang", False), ("report", True), ("category", True)):
        problem = _text_problem(field, row.get(field), optional)
        if problem:
            return problem
    if not row["question"]:
        return "empty question"
    if not row["answer"]:
        return "empty answer"
    if row.get("answer_type") is None:
        return "missing field 'answer_type'"
    if row["answer_type"] not in ("closed", "open"):
        return f"answer_type {_short(row['answer_type'])} is neither closed nor open"
    if not isinstance(row["keywords"], list) or any(_text_problem("k", k) for k in row["keywords"]):
        return f"keywords must be a list of strings, not {_short(row['keywords'])}"
    # a pseudo-label's fields (retrieve.py writes them, sft.py reads them)
    if row.get("target") is not None:
        problem = _text_problem("target", row["target"])
        if problem or not row["target"].strip():
            return problem or "empty target"
    evidence = row.get("evidence")
    if evidence is not None and (not isinstance(evidence, list) or not all(
            isinstance(p, dict) and not _text_problem("text", p.get("text")) for p in evidence)):
        return f"evidence must be a list of passages {{\"text\": ...}}, not {_short(evidence)}"
    image = row["image"]
    if isinstance(image, str):
        if image not in exists:  # a regular file: a folder, a FIFO or /dev/stdin would not decode (or would hang)
            exists[image] = bool(image) and os.path.isfile(image)
        if not exists[image]:
            return f"image file does not exist: {image}" if not os.path.exists(image) else \
                f"image is not a regular file: {image}"
    elif not isinstance(image, Image.Image):
        return f"image must be a path or a PIL image, not {type(image).__name__} {_short(image)}"
    return None


# rows of official releases known to be broken: dropped with a note, never an error
KNOWN_BAD = {"slake-1622": "a known quirk of the official SLAKE 1.0 train.json"}


def _finish(raw, name, split, lang, skip_bad_rows, limit):
    """Check the rows a loader yields as (file, where, row-or-problem); raise, skip or drop the bad ones.

    Every row leaves with an id, and no two with the same one: a row without one gets FILE-N (its line or
    row number), a repeated id gets a suffix (id#2, id#3, ...). Both depend only on the source, so a rerun
    (retrieve.py resuming) sees the same ids.
    """
    rows, skipped, dropped, renamed, exists, ids = [], [], [], [], {}, set()
    for file, where, row in raw:
        if isinstance(row, dict) and row.get("id") is None:
            row["id"] = f"{os.path.splitext(os.path.basename(file))[0]}-{where.split()[-1]}"
        problem = row if isinstance(row, str) else _problem(row, exists)
        if problem is None:
            if row["id"] in ids:
                new = next(f"{row['id']}#{k}" for k in itertools.count(2) if f"{row['id']}#{k}" not in ids)
                renamed.append(f"{file}: {where}: id {row['id']} -> {new}")
                row["id"] = new
            ids.add(row["id"])
            rows.append(row)
            if limit and len(rows) >= limit:
                break
            continue
        rid = row.get("id") if isinstance(row, dict) else None
        rid = rid if isinstance(rid, str) and len(rid) <= 80 else _short(rid) if rid is not None else None
        msg = " ".join(f"{file}: {where}{f' (id {rid})' if rid else ''}: {problem}".splitlines())
        if rid in KNOWN_BAD:
            dropped.append(f"{msg} ({KNOWN_BAD[rid]})")
        elif skip_bad_rows:
            skipped.append(msg)
        else:
            raise DataError(msg)
    if dropped:
        print(f"dropped {len(dropped)} known-bad rows: {dropped[0]}", file=sys.stderr)
    if renamed:
        print(f"{len(renamed)} repeated ids made unique: first: {renamed[0]}", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} bad rows of {name}: first problem: {skipped[0]}", file=sys.stderr)
    if not rows:  # all rows bad (and skipped) is bad data; no rows at all is a missing split
        raise (DataError if skipped else SplitNotFound)(
            f"{name}: empty dataset: no rows for split {split!r} and lang {lang!r}")
    return rows


def _read_text(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: line {line}: not UTF-8 ({e.reason} at byte {e.start})") from None


def _parse_json(text):
    """(the value, None) or (None, what is wrong). Python's json also raises ValueError for an integer of over
    4,300 digits and RecursionError for brackets nested thousands deep: both are bad input, not a crash."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg})"
    except (ValueError, RecursionError) as e:
        return None, f"invalid JSON ({type(e).__name__}: {str(e)[:80]})"


def _read_json(path):
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # see _parse_json
        raise DataError(f"{path}: invalid JSON ({type(e).__name__}: {str(e)[:80]})") from None


# -----------------------------------------------------------------------------
# JSONL: the one writer and the one reader, so that whatever one stage writes the next reads
# (pseudo-labels, metrics.jsonl, rollouts.jsonl, predictions.jsonl, users' rows)

# line breaks to str.splitlines() (and to some editors) that JSON allows raw inside a string; json.dumps
# escapes those below U+0020 itself
_RAW_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def jsonl_line(record):
    """One record as one line: JSON with text kept readable (not \\u-escaped), no line break inside, then "\\n"."""
    text = json.dumps(record, ensure_ascii=False).translate(_RAW_BREAKS)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate cannot be written as UTF-8: escaped, it reads back the same
        text = json.dumps(record)
    return text + "\n"


def append_jsonl(path, records):
    """Append records to a JSONL file, one line each (one write per call: a kill tears at most the last line)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(jsonl_line(r) for r in records))


def write_jsonl(path, records):
    """A JSONL file of records, written to PATH.tmp and renamed: a kill never leaves half of it."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(jsonl_line(r) for r in records)
    os.replace(path + ".tmp", path)


def read_jsonl(path):
    """[(line number, the record, None) or (line number, None, what is wrong with the line)] of a JSONL file.

    Lines end at "\\n", "\\r\\n" or "\\r" (JSON escapes both inside a string), never at U+2028, U+2029 or
    U+0085, where str.splitlines() also breaks: JSON allows them raw inside a string. A byte-order mark and
    blank lines are fine; a file that is not UTF-8 is a DataError.
    """
    items = []
    for n, line in enumerate(re.split(r"\r\n|\r|\n", _read_text(path)), 1):
        if line.strip():
            value, problem = _parse_json(line)
            items.append((n, value, problem))
    return items


def cut_torn_line(path):
    """A JSONL file this project appends to (pseudo-labels, metrics, rollouts), after a crash or a full disk
    mid-write: a last line without its "\\n" is cut, or, if it is whole JSON, given its "\\n". Returns the
    bytes cut (b"" when none)."""
    if not os.path.isfile(path):
        return b""
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return b""
        start = data.rfind(b"\n") + 1
        try:
            _, problem = _parse_json(data[start:].decode("utf-8"))
        except UnicodeDecodeError:  # torn inside a multi-byte character
            problem = "not UTF-8"
        if problem is None:
            f.write(b"\n")
            return b""
        f.truncate(start)
        return data[start:]


def truncate_jsonl(path, step):
    """Resume: keep the records of steps up to `step` of a metrics or rollouts file (all of a fresh run's go:
    step 0). A torn last line, or any line that is not a record, is dropped with a note. Rewritten atomically."""
    keep, bad = [], []
    if step and os.path.exists(path):
        cut = cut_torn_line(path)
        bad += [f"a torn last line ({len(cut)} bytes)"] if cut else []
        for n, rec, _ in read_jsonl(path):
            if isinstance(rec, dict) and isinstance(rec.get("step", 0), int):
                if rec.get("step", 0) <= step:
                    keep.append(rec)
            else:
                bad.append(f"line {n}")
    if bad:
        print(f"{path}: dropped {len(bad)} broken lines ({', '.join(bad[:3])})", file=sys.stderr)
    write_jsonl(path, keep)


# -----------------------------------------------------------------------------
# output paths, checked before any work (a bad --out must not lose a run's results)

def _probe(folder, flag, path):
    """Create and delete a file in `folder` (created if needed), or a one-line DataError saying why not."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        above = os.path.abspath(folder)
        while not os.path.exists(above):
            above = os.path.dirname(above)
        why = f"{above} is a file, not a folder" if not os.path.isdir(above) else e.strerror or str(e)
        raise DataError(f"{flag} {path}: cannot write there ({why})") from None


def writable_file(path, flag="--out"):
    """`path` as a file this process can write (its folder made if needed), or a one-line DataError. An
    existing file must be a regular one: the results are written beside it and renamed over it, which
    would replace a device such as /dev/null."""
    if not path:
        raise DataError(f"{flag}: an empty path")
    if os.path.isdir(path):
        raise DataError(f"{flag} {path}: is a folder; give a file name")
    if os.path.exists(path) and not os.path.isfile(path):
        raise DataError(f"{flag} {path}: exists and is not a regular file")
    _probe(os.path.dirname(os.path.abspath(path)), flag, path)
    try:
        if os.path.exists(path):
            open(path, "ab").close()  # opened for appending: nothing written, nothing truncated
    except OSError as e:
        raise DataError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    return path


def writable_folder(path, flag="--out"):
    """`path` as a folder this process can write (made if needed), or a one-line DataError."""
    if not path:
        raise DataError(f"{flag}: an empty path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f"{flag} {path}: exists and is not a folder")
    _probe(path, flag, path)
    return path


# -----------------------------------------------------------------------------
# images

def load_image(row_or_image):
    """An RGB PIL image from a row, a path or a PIL image, as the model sees it (_rgb); DataError names the
    file if it is missing or corrupt. A multi-frame image (GIF, TIFF) gives its first frame."""
    where = ""
    if isinstance(row_or_image, dict):
        where = f" (row {row_or_image.get('id')})"
        row_or_image = row_or_image.get("image")
    if isinstance(row_or_image, Image.Image):
        info = row_or_image.info
        name = info.get("medfact_source", "in-memory image")
        try:
            if "medfact_bytes" in info:  # embedded: decode a fresh copy, so rows never hold decoded pixels
                with Image.open(io.BytesIO(info["medfact_bytes"])) as im:
                    return _rgb(im)
            return _rgb(row_or_image)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(f"{name}{where}: cannot decode image ({type(e).__name__}: {e})") from None
    if not isinstance(row_or_image, (str, os.PathLike)):
        raise DataError(f"<{type(row_or_image).__name__}>{where}: an image must be a path or a PIL image")
    path = os.fspath(row_or_image)
    if not os.path.exists(path):
        raise DataError(f"{path}{where}: image file does not exist")
    if not os.path.isfile(path):
        raise DataError(f"{path}{where}: image is not a regular file")
    try:
        with Image.open(path) as im:
            return _rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}{where}: cannot decode image ({type(e).__name__}: {e})") from None


def _rgb(im):
    """RGB pixels, whatever the mode. PIL's convert("RGB") alone would clip every value of a 16-bit, 32-bit
    or float image over 255 to white (a 16-bit radiograph: 99% white), so those are scaled to 8 bits first,
    by their bit depth: values within 0..255 stay; non-negative values of N bits (10, 12, 16, ...) are
    multiplied by 255 / (2^N - 1); a float image within 0..1 by 255; one with negative values (CT units)
    is stretched from its lowest value to its highest; NaN and inf become 0. Transparency is laid over
    white, as transformers' convert_rgb does."""
    if im.mode.startswith("I") or im.mode == "F":  # I, I;16, I;16B, I;16L, I;16N, F
        a = np.asarray(im, dtype=np.float32)
        a = np.where(np.isfinite(a), a, 0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo < 0:
            a = (a - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(a)
        elif im.mode == "F" and hi <= 1:
            a = a * 255
        else:
            a = a * (255 / (2 ** max(8, math.ceil(math.log2(hi + 1))) - 1))
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def _image_from_bytes(data, source):
    """(an undecoded PIL image, None) from embedded bytes, or (None, the problem).

    Only the header is read here (cheap, and it catches non-images). load_image() decodes the bytes afresh
    each time: decoding in place would keep every image's pixels alive (PathVQA: 33k images).
    """
    try:
        im = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises many types for garbage bytes
        return None, f"cannot read embedded image ({type(e).__name__}: {e})"
    im.info.update(medfact_source=source, medfact_bytes=data)  # load_image() names the source on failure
    return im, None


# -----------------------------------------------------------------------------
# the second check, once a stage has its model: each image decodes and each prompt fits

class ImageCache:
    """load_image(row), then fit (e.g. model.VLM.fit_image), kept per distinct image (image_key), the least
    recently used dropped beyond max_bytes of pixels: a run decodes and resizes each image once, not at every
    use (SFT on SLAKE uses each of its 450 images ~140 times). Rows must keep their in-memory images alive
    while the cache is used (an image without a path or bytes is known by its id)."""

    def __init__(self, fit=None, max_bytes=2 * 2 ** 30):
        self.fit, self.max_bytes, self.items, self.bytes = fit, max_bytes, collections.OrderedDict(), 0

    def __call__(self, row):
        key = image_key(row.get("image") if isinstance(row, dict) else row)
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        image = load_image(row)
        image = self.fit(image) if self.fit else image
        self.items[key] = image
        self.bytes += image.width * image.height * len(image.getbands())
        while self.bytes > self.max_bytes and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.width * old.height * len(old.getbands())
        return image


def image_key(image):
    """What tells images apart, to decode each once: a path, the hash of embedded bytes, or the object."""
    if isinstance(image, Image.Image):
        data = image.info.get("medfact_bytes")
        return hashlib.sha1(data).hexdigest() if data is not None else id(image)
    return image


def check_rows(vlm, rows, skip_bad_rows=False, target=False):
    """The rows whose image decodes and whose prompt fits the model (vlm: a model.VLM), before step 1.

    Each image goes through what the model will do with it: load_image (decode, mode), then the image
    processor's resize rule (vlm.image_tokens), which refuses some shapes (an aspect ratio over 200).
    With target=True (sft.py) the prompt and its target together must fit. vlm=None (retrieve.py, which
    has no model) checks that each image decodes. A bad row raises a one-line DataError naming the
    source, the row and the problem (so no bad row stops a run midway); with skip_bad_rows it is skipped
    and counted instead. Image tokens are never truncated. Each distinct image is decoded once.
    """
    good, bad, sizes = [], [], {}
    for r in rows:
        try:
            key = image_key(r["image"])
            if key not in sizes:  # only good images are remembered: a bad one names each of its rows
                sizes[key] = load_image(r).size
            if vlm is not None:
                source = r["image"] if isinstance(r["image"], str) else r.get("dataset")
                try:
                    n, n_img = vlm.prompt_length(sizes[key], r["question"])
                except ValueError as e:  # transformers' smart_resize
                    w, h = sizes[key]
                    raise DataError(f"{source} (row {r.get('id')}): the image processor refuses a {w}x{h} "
                                    f"image ({e})") from None
                what = "prompt"
                if target:
                    if not isinstance(r.get("target"), str):
                        raise DataError(f"{r.get('dataset')}: row {r.get('id')}: no 'target' text")
                    n += len(vlm.tokenizer(r["target"], add_special_tokens=False).input_ids) + 1
                    what = "prompt and target"
                if n > vlm.max_len:
                    raise DataError(f"{r.get('dataset')}: row {r.get('id')}: {what} is {n} tokens ({n_img} image "
                                    f"tokens), over the model's limit of {vlm.max_len}; image tokens are never "
                                    f"truncated: lower --max_pixels or shorten the question")
            good.append(r)
        except DataError as e:
            if not skip_bad_rows:
                raise
            bad.append(str(e))
    if bad and int(os.environ.get("RANK", 0)) == 0:  # every rank checks its copy; one says so (torchrun's RANK)
        print(f"skipped {len(bad)} bad rows of {len(rows)}: first problem: {bad[0]}", file=sys.stderr, flush=True)
    if rows and not good:
        raise DataError(f"{rows[0].get('dataset')}: empty dataset: all {len(rows)} rows are bad")
    return good


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
    records = _read_json(file)
    # the official test split is the phrase_type test_freeform + test_para rows; train and val the others
    keep = [r for r in records if not isinstance(r, dict) or
            str(r.get("phrase_type", "")).startswith("test") == (split == "test")]
    yield from _vqa_rad_rows(file, keep, os.path.join(root, VQA_RAD_IMAGES), split, "vqa-rad-")


def _load_mevf(root, split):
    file = os.path.join(root, MEVF_FILES["test" if split == "test" else "train"])  # val: held out of train
    image_dir = os.path.join(root, "images")
    if not os.path.isdir(image_dir):  # the split files alone, next to the OSF release's image folder
        image_dir = os.path.join(os.path.dirname(os.path.normpath(root)), VQA_RAD_IMAGES)
    yield from _vqa_rad_rows(file, _read_json(file), image_dir, split, f"vqa-rad-mevf-{split}-")


# -----------------------------------------------------------------------------
# SLAKE 1.0

SLAKE_FILES = {"train": ["train.json"], "val": ["validate.json", "validation.json"], "test": ["test.json"]}


def _load_slake(root, split, lang):
    files = [os.path.join(root, f) for f in SLAKE_FILES[split] if os.path.exists(os.path.join(root, f))]
    if not files:
        raise SplitNotFound(f"{root}: SLAKE split file {SLAKE_FILES[split][0]} does not exist")
    file = files[0]
    for i, r in enumerate(_read_json(file)):
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
    import itertools
    import pyarrow.parquet as pq  # a dependency of `datasets`
    if by_file_name:
        names = [k for k, v in SPLITS.items() if v == split]
        files = [f for f in files if os.path.basename(f).split("-")[0].split(".")[0] in names]
    shared, counter = {}, itertools.count()  # across the split's files: one bytes object per image, unique ids
    for file in files:
        try:  # the footer: a file that is not parquet, or was cut short, fails here
            table = pq.ParquetFile(file)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
            raise DataError(f"{file}: not a readable parquet file ({type(e).__name__}: {e})") from None
        batches = (b.to_pylist() for b in table.iter_batches(batch_size=512))
        yield from _table_rows(file, batches, split, lang, dataset, os.path.dirname(file), shared, counter,
                               own_split=not by_file_name)


def _datasets_name(ds):
    """A name for a datasets.Dataset / DatasetDict in messages."""
    name = getattr(getattr(ds, "info", None), "dataset_name", None)
    return f"<{type(ds).__module__.split('.')[0]}.{type(ds).__name__}{' ' + name if name else ''}>"


def _load_datasets(ds, split, lang, name, dataset=None):
    """Rows of a datasets.Dataset, or of one split of a DatasetDict (train / validation / val / test)."""
    import itertools
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
    yield from _table_rows(name, batches, split, lang, dataset or ds.info.dataset_name or "dataset", None, {},
                           itertools.count(), own_split=whole)


def _table_rows(name, batches, split, lang, dataset, folder, shared, counter, own_split):
    """Rows from batches of records (parquet, a datasets.Dataset), every field kept, as the JSONL reader keeps
    them. own_split: the records may be of several splits (one parquet file, one Dataset), so a record's split
    field says which, as in a JSONL file (a file named for a split, or a DatasetDict's split, says it for all).
    Embedded image bytes are shared: `shared` maps each image's bytes to one bytes object, so a split that
    repeats an image on every question of it (PathVQA: 20k rows over ~2.5k images) holds each image once."""
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
                    data = shared.setdefault(image["bytes"], image["bytes"])
                    image, problem = _image_from_bytes(data, f"{name} row {i}")
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
    problem = _text_problem("split", row_split, optional=True) or _text_problem("lang", row_lang)
    if problem:
        return None, problem
    row_lang = row_lang.strip().lower() or "en"  # "EN" is English too, not a language no one asked for
    if row_split is not None and row_split not in SPLITS:
        return None, f"unknown split {_short(row_split)}"
    if (row_split is not None and SPLITS[row_split] != split) or (lang != "all" and row_lang != lang):
        return None, None
    return row_lang, None


def _load_rows_file(file, split, lang, dataset=None):
    """Rows in our schema, from a .jsonl (one object a line, read_jsonl) or a .json list. Image paths are
    relative to the file.

    A row with a "split" field is kept only for that split; a row without one belongs to every split. A row
    without "lang" is English.
    """
    stem = os.path.splitext(os.path.basename(file))[0]
    if file.endswith(".jsonl"):
        items = [(f"line {n}", r, problem) for n, r, problem in read_jsonl(file)]
    else:
        records = _read_json(file)
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


def _load_hub(source, split, lang):
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
        image, problem = _image_from_bytes(ex["image"]["bytes"], f"{HUB[source]} {hub_split} row {i}")
        yield HUB[source], f"row {i}", problem or _row(f"{source}-{split}-{i}", image, ex.get("question"),
                                                       ex.get("answer"), None, source, split)


# -----------------------------------------------------------------------------
# rows out: a datasets.Dataset that load() reads back unchanged

STRING_FIELDS = ("id", "question", "answer", "answer_type", "dataset", "split", "lang", "report", "category",
                 "target", "writer")
STRING_LIST_FIELDS = ("keywords", "evidence_ids")


def to_dataset(rows):
    """Rows (load()'s, or retrieve.py's pseudo-labels) -> a datasets.Dataset keeping every field.

    The features are explicit where the row's meaning is known: the image is a datasets.Image with its bytes
    embedded (from the file, or PNG for an in-memory image; one bytes object per distinct image), so the
    dataset travels alone; keywords and evidence_ids are lists of strings; the text fields are strings (a
    missing one is None). Other fields (evidence, source, ...) take Arrow's inferred types. Share it with
    ds.to_parquet(path), ds.save_to_disk(folder) or ds.push_to_hub(repo); load() reads each back with every
    field equal (the image then an in-memory image of the same bytes), so pseudo-labels shared as a dataset
    feed sft.py and the fact reward as the JSONL does.
    """
    import datasets
    import pyarrow as pa
    encoded = {}

    def image_bytes(row):
        image = row.get("image")
        key = image if isinstance(image, str) else id(image)
        if key not in encoded:
            if isinstance(image, str):
                try:
                    with open(image, "rb") as f:
                        encoded[key] = {"bytes": f.read(), "path": os.path.basename(image)}
                except OSError as e:
                    raise DataError(f"{image} (row {row.get('id')}): cannot read image ({e.strerror})") from None
            elif isinstance(image, Image.Image):
                data = image.info.get("medfact_bytes")  # loaded from embedded bytes: kept as they were
                if data is None:
                    buf = io.BytesIO()
                    image.save(buf, format="PNG")
                    data = buf.getvalue()
                encoded[key] = {"bytes": data, "path": None}
            else:
                raise DataError(f"row {row.get('id')}: image must be a path or a PIL image, not "
                                f"{type(image).__name__}")
        return encoded[key]

    columns = list(dict.fromkeys(k for r in rows for k in r))  # every field of any row, in first-seen order
    records = [{k: image_bytes(r) if k == "image" else r.get(k) for k in columns} for r in rows]
    features = {}
    for k in columns:
        if k == "image":
            features[k] = datasets.Image()
        elif k in STRING_FIELDS:
            features[k] = datasets.Value("string")
        elif k in STRING_LIST_FIELDS:
            features[k] = datasets.List(datasets.Value("string"))
        else:  # what Arrow infers from the values, e.g. evidence: a list of {"id", "title", "text"}
            schema = pa.schema([pa.field(k, pa.array([r[k] for r in records]).type)])
            features[k] = datasets.Features.from_arrow_schema(schema)[k]
    return datasets.Dataset.from_list(records, features=datasets.Features(features))
