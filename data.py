"""
data.py: the rows. Every dataset medfact trains or evaluates on becomes the same rows, each read as a dict:

    {"id": str, "image": str (path) or PIL.Image, "question": str, "answer": str,
     "answer_type": "closed" | "open", "dataset": str, "split": str, "lang": str,
     "keywords": [str], "report": str | None, "category": str | None}

plus a pseudo-label's fields (target, writer, evidence_ids) and any other field the source has. `category`
is our addition to the paper's row: the question category (the demo's categories, SLAKE's content_type,
VQA-RAD's question_type), so evaluate.py can break accuracy down by it. Split names are "train", "val" and
"test" ("validation" and "validate" are accepted and mean "val").

    load("demo", "train")                  # the synthetic chest X-ray set (synthetic_cxr.py)
    load("vqa-rad", "test")                # $MEDFACT_DATA_DIR/vqa_rad if set, else the hub
    load("slake", "test", lang="zh")       # $MEDFACT_DATA_DIR/slake if set, else the hub
    load("pathvqa", "val")                 # $MEDFACT_DATA_DIR/pathvqa if set, else the hub
    load("path/to/Slake1.0", "train")      # a local copy in its original layout (sources.py)
    load("rows.jsonl", "train")            # rows in the schema above, one JSON object a line
    load("rows.parquet", "train")          # the same rows as parquet (e.g. to_dataset(rows).to_parquet(...))
    load(dataset_or_dict, "train")         # a datasets.Dataset / DatasetDict, or a save_to_disk folder
    stream(source, "train")                # the same rows, checked, one at a time, without the cache
    to_dataset(rows)                       # rows (pseudo-labels too) -> a datasets.Dataset, images embedded

**Rows at any size.** load() returns Rows: a sequence (len, rows[i], slices, select, iteration) over an Arrow
file, so memory does not grow with the split (PMC-VQA: 227k questions). The file is built once per source, split
and options, and cached under $MEDFACT_CACHE (default ~/.cache/medfact/rows), keyed by the source's data files
(path, size, modification time; not its images) and this code; a second load opens the cache (a file lock makes
one process build it while the others, torchrun's ranks too, wait and read the same file); the version of a
changed source is replaced, the old one deleted a day after its last use. Arrow's IPC file
format, as `datasets` keeps its caches, but read with pread a record batch at a time, never memory-mapped: a
scan of a mapped file keeps every page it touched (and the kernel's neighbours) resident, 62 MB more at 200k
rows than at 20k for one pass over three text columns; a scan here reads only its columns. Images stay as
they came: a path, or the embedded bytes, opened undecoded on access (images.py); the build reads each
image's header for its size, a column check_rows uses.
stream() walks a source forward, checked, without a cache, for sets larger than a disk cache should hold:
evaluate.py --stream N reads a split so; the training stages sample rows at random and read the cache.

Every field a stage reads is checked at load time, for type and content: text is a str (an integer or
finite number answer becomes one; a list, a dict, a bool, NaN or a lone surrogate is a bad row), keywords
a list of str, a pseudo-label's target text and its evidence (if any) a list of passages. Every row leaves
with a unique id: one without an id gets FILE-N from its line or row number, a repeated one a suffix
(id#2); both depend on the data alone, so a rerun sees the same ids. Image paths must be regular files.
A bad row raises DataError (one line naming the file, the row and the problem) unless skip_bad_rows,
which skips it and prints one summary line. Known-bad rows of official releases are dropped with a note
(SLAKE train qid 1622 has an empty answer: 4,918 English train rows, not 4,919). A split that does not
exist, or holds no rows, raises SplitNotFound, so a caller can tell "no validation split" from a bad row.

check_rows(vlm, rows) is the second check, once a stage has its model: every image's header reads, the
image processor's resize rule takes its size (it refuses an aspect ratio over 200), and every prompt fits
the model's context (with target=True, prompt and target). Its token counts are cached beside the rows,
per tokenizer and image processor, so a resumed run pays nothing. vlm=None (retrieve.py): the headers read.

Departures from the paper: MEDFACT-R1 trains on real data only and never released its data code; the
demo, the known-bad-row policy, the validation split names and the `category` field are ours.
"""

import collections
import contextlib
import hashlib
import io
import itertools
import json
import os
import sys

import numpy as np
from PIL import Image

import synthetic_cxr
from files import (DataError, SplitNotFound, append_jsonl, cut_torn_line, iter_jsonl, jsonl_line,  # noqa: F401
                   read_jsonl, short, text_problem, truncate_jsonl, writable_file, writable_folder, write_jsonl)
from images import ImageCache, image_from_bytes, image_key, image_size, load_image  # noqa: F401
from rewards import normalize_answer  # noqa: F401  ONE answer normalisation, shared with rewards and evaluation
from sources import HUB, LOCAL_NAMES, SPLITS, datasets_name, datasets_rows, detect, hub_rows

__all__ = ["DataError", "SplitNotFound", "Rows", "load", "stream", "load_image", "check_rows", "to_dataset",
           "normalize_answer", "jsonl_line", "append_jsonl", "write_jsonl", "read_jsonl", "cut_torn_line",
           "truncate_jsonl", "writable_file", "writable_folder", "image_key", "ImageCache"]


# -----------------------------------------------------------------------------
# the entry points

def load(source, split, lang="en", skip_bad_rows=False, limit=None):
    """Rows of one split of `source`: "demo", a dataset name, a local folder, a .jsonl or .parquet file,
    or a datasets.Dataset / DatasetDict. Built once into the row cache, then mapped (see the docstring)."""
    name, split, raw, key = _source(source, split, lang)
    key = _cache_key(key, split, lang, skip_bad_rows, limit)
    return _cached(key, lambda: _checked(raw(), name, split, lang, skip_bad_rows, limit))


def stream(source, split, lang="en", skip_bad_rows=False, limit=None):
    """The rows of load(), checked the same way, one dict at a time, without building a cache: for a forward
    walk over a set larger than a disk cache should hold. Nothing is counted until the end."""
    name, split, raw, _ = _source(source, split, lang)
    for kind, item in _checked(raw(), name, split, lang, skip_bad_rows, limit):
        if kind == "row":
            yield item
        else:
            print(item, file=sys.stderr)


def _source(source, split, lang):
    """(a name for messages, the split, a function giving the raw rows, what the cache is keyed by)."""
    in_memory = not isinstance(source, (str, os.PathLike))  # a datasets object, not a name or a path
    name = datasets_name(source) if in_memory else os.fspath(source)
    if split not in SPLITS:
        raise DataError(f"{name}: unknown split {split!r} (use train, val/validation/validate or test)")
    split = SPLITS[split]
    if in_memory:
        fingerprints = [getattr(d, "_fingerprint", None) for d in (source.values() if isinstance(source, dict)
                                                                   else [source])]
        key = (["datasets", name], fingerprints) if all(fingerprints) else None  # None: built afresh each time
        return name, split, lambda: datasets_rows(source, split, lang, name), key
    if name == "demo":
        return name, split, lambda: _demo_rows(split, lang), (["demo"], None)
    path = name
    if name in HUB:
        data_dir = os.environ.get("MEDFACT_DATA_DIR")
        if not data_dir:
            return HUB[name], split, lambda: hub_rows(name, split, lang), (["hub", name], None)
        path = os.path.join(data_dir, LOCAL_NAMES[name])
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise DataError(f"{path}: dataset path does not exist")
    found, rows = detect(path, split, lang, dataset=name if name in HUB else None)
    return found, split, lambda: rows, (["path", path, name if name in HUB else None], _stamp(path))


def _demo_rows(split, lang):
    rows = [r for r in synthetic_cxr.rows(split) if lang in ("all", r["lang"])]
    if not rows:
        raise SplitNotFound(f"demo: no rows for split {split!r} and lang {lang!r}")
    for i, r in enumerate(rows):
        yield "demo", f"row {i}", dict(r)


def tokenizer_texts():
    """What a model built from scratch (model.load("tiny"), "random:...") trains its tokenizer on when a stage
    has no texts of its own for it (evaluate.py or grpo.py with --ckpt tiny): the demo's questions, answers,
    reports and glossary (synthetic_cxr.tokenizer_texts). sft.py passes its pseudo-labels' instead."""
    return synthetic_cxr.tokenizer_texts()


# -----------------------------------------------------------------------------
# checking the rows a source yields, and the one place bad rows are reported

def _problem(row, exists):
    """What is wrong with a row (a str), or None: every field a stage reads, its type and its content.
    `exists` caches os.path.isfile per image path."""
    for field in ("image", "question", "answer"):
        if row.get(field) is None:
            return f"missing field {field!r}"
    if not isinstance(row["id"], str):
        return f"id must be text or an integer, not {type(row['id']).__name__} {short(row['id'])}"
    for field, optional in (("id", False), ("question", False), ("answer", False), ("dataset", False),
                            ("split", False), ("lang", False), ("report", True), ("category", True)):
        problem = text_problem(field, row.get(field), optional)
        if problem:
            return problem
    if not row["question"]:
        return "empty question"
    if not row["answer"]:
        return "empty answer"
    if row.get("answer_type") is None:
        return "missing field 'answer_type'"
    if row["answer_type"] not in ("closed", "open"):
        return f"answer_type {short(row['answer_type'])} is neither closed nor open"
    if not isinstance(row["keywords"], list) or any(text_problem("k", k) for k in row["keywords"]):
        return f"keywords must be a list of strings, not {short(row['keywords'])}"
    # a pseudo-label's fields (retrieve.py writes them, sft.py reads them)
    if row.get("target") is not None:
        problem = text_problem("target", row["target"])
        if problem or not row["target"].strip():
            return problem or "empty target"
    evidence = row.get("evidence")
    if evidence is not None and (not isinstance(evidence, list) or not all(
            isinstance(p, dict) and not text_problem("text", p.get("text")) for p in evidence)):
        return f"evidence must be a list of passages {{\"text\": ...}}, not {short(evidence)}"
    image = row["image"]
    if isinstance(image, str):
        if image not in exists:  # a regular file: a folder, a FIFO or /dev/stdin would not decode (or would hang)
            exists[image] = bool(image) and os.path.isfile(image)
        if not exists[image]:
            return f"image file does not exist: {image}" if not os.path.exists(image) else \
                f"image is not a regular file: {image}"
    elif not isinstance(image, Image.Image):
        return f"image must be a path or a PIL image, not {type(image).__name__} {short(image)}"
    return None

# rows of official releases known to be broken: dropped with a note, never an error
KNOWN_BAD = {"slake-1622": "a known quirk of the official SLAKE 1.0 train.json"}


def _checked(raw, name, split, lang, skip_bad_rows, limit):
    """("row", row) for each good row a loader yields as (file, where, row-or-problem), then ("note", text)
    for what was dropped, renamed or skipped; bad rows raise unless skipped or known.

    Every row leaves with an id, and no two with the same one: a row without one gets FILE-N (its line or
    row number), a repeated id gets a suffix (id#2, id#3, ...). Both depend only on the source, so a rerun
    (retrieve.py resuming) sees the same ids.
    """
    n, skipped, dropped, renamed, exists, ids = 0, [], [], [], {}, set()
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
            yield "row", row
            n += 1
            if limit and n >= limit:
                break
            continue
        rid = row.get("id") if isinstance(row, dict) else None
        rid = rid if isinstance(rid, str) and len(rid) <= 80 else short(rid) if rid is not None else None
        msg = " ".join(f"{file}: {where}{f' (id {rid})' if rid else ''}: {problem}".splitlines())
        if rid in KNOWN_BAD:
            dropped.append(f"{msg} ({KNOWN_BAD[rid]})")
        elif skip_bad_rows:
            skipped.append(msg)
        else:
            raise DataError(msg)
    if dropped:
        yield "note", f"dropped {len(dropped)} known-bad rows: {dropped[0]}"
    if renamed:
        yield "note", f"{len(renamed)} repeated ids made unique: first: {renamed[0]}"
    if skipped:
        yield "note", f"skipped {len(skipped)} bad rows of {name}: first problem: {skipped[0]}"
    if not n:  # all rows bad (and skipped) is bad data; no rows at all is a missing split
        raise (DataError if skipped else SplitNotFound)(
            f"{name}: empty dataset: no rows for split {split!r} and lang {lang!r}")


# -----------------------------------------------------------------------------
# the row cache: one Arrow file per (source, split, options), read by every process that loads it

BASE = ("id", "image", "question", "answer", "answer_type", "dataset", "split", "lang", "keywords", "report",
        "category")
TEXT = ("id", "question", "answer", "answer_type", "dataset", "split", "lang", "report", "category", "target",
        "writer")
OPTIONAL = ("target", "writer", "evidence_ids")  # a pseudo-label's: in the row when not null
BATCH = 256  # rows per record batch of the cache: what a random row read costs
_CODE = []


def cache_dir():
    return os.path.join(os.environ.get("MEDFACT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                        "medfact"), "rows")


def _schema():
    import pyarrow as pa
    fields = [pa.field(k, pa.string()) for k in TEXT] + [
        pa.field("image", pa.string()), pa.field("image_bytes", pa.binary()), pa.field("width", pa.int32()),
        pa.field("height", pa.int32()), pa.field("image_problem", pa.string()), pa.field("image_source", pa.string()),
        pa.field("keywords", pa.list_(pa.string())), pa.field("evidence_ids", pa.list_(pa.string())),
        pa.field("extra", pa.string())]  # every other field of the row, as JSON
    return pa.schema(fields)


def _stamp(path):
    """What a local source's rows depend on: its data files' paths, sizes and modification times (images
    are not read: their existence and size are checked when the cache is built)."""
    if os.path.isfile(path):
        st = os.stat(path)
        return [[path, st.st_size, st.st_mtime_ns, st.st_ino]]
    out = []
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if folder.count(os.sep) - path.count(os.sep) < 2)
        for f in sorted(files):
            if f.endswith((".json", ".jsonl", ".parquet", ".arrow")):
                st = os.stat(os.path.join(folder, f))
                out.append([os.path.relpath(os.path.join(folder, f), path), st.st_size, st.st_mtime_ns, st.st_ino])
    return out


def _cache_key(key, split, lang, skip_bad_rows, limit):
    if key is None:
        return None
    if not _CODE:  # the code that makes rows: a change to it rebuilds every cache
        here = os.path.dirname(os.path.abspath(__file__))
        h = hashlib.sha1()
        for f in ("data.py", "sources.py", "images.py", "files.py", "synthetic_cxr.py", "rewards.py"):
            with open(os.path.join(here, f), "rb") as fh:
                h.update(fh.read())
        _CODE.append(h.hexdigest())
    (what, version) = key  # which rows (the slot), and which version of them (the data files' stamp, the code)
    slot = json.dumps([what, split, lang, bool(skip_bad_rows), limit or None], default=str)
    version = json.dumps([version, _CODE[0]], default=str)
    return "-".join(hashlib.sha1(t.encode()).hexdigest()[:16] for t in (slot, version))


def _cached(key, build):
    """Rows of the cache file for `key`, built (by one process at a time) when it is not there."""
    if key is None:  # an in-memory dataset without a fingerprint: built into a fresh temporary file
        import tempfile
        folder = tempfile.mkdtemp(prefix="medfact-rows-")
        return _write(os.path.join(folder, "rows.arrow"), build())
    import fcntl
    folder = cache_dir()
    path = os.path.join(folder, key + ".arrow")
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(path + ".lock", "a")
    except OSError as e:  # a read-only home, say: this run builds its own copy, and says so once
        print(f"row cache {folder} not writable ({e.strerror or e}): set $MEDFACT_CACHE; building into a temporary "
              f"folder", file=sys.stderr)
        return _cached(None, build)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait here, then map what the first one built
        try:
            if os.path.exists(path) and os.path.exists(path + ".json"):
                return Rows.open(path)
            rows = _write(path, build())
            _forget_old_versions(folder, key)
            return rows
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _forget_old_versions(folder, key, days=1):
    """Delete the cache files of other versions of the same rows (the source changed, or the code) unused for a
    day: the cache keeps one copy of each split, not one per edit of a JSONL, while a run that may still read an
    older version (for hours) keeps it."""
    import glob
    import time
    slot = key.split("-")[0]
    for old in glob.glob(os.path.join(folder, slot + "-*.arrow")):  # its time: when a load last opened it
        if not os.path.basename(old).startswith(key) and time.time() - os.path.getmtime(old) > days * 86400:
            for f in glob.glob(old + "*"):  # the file, its notes, lock and token counts
                with contextlib.suppress(OSError):
                    os.remove(f)


def _write(path, items):
    """Write the checked rows to an Arrow file (to PATH.tmp, then renamed), and the notes beside it."""
    import pyarrow as pa
    schema, notes, n, batch, images = _schema(), [], 0, [], {}
    with pa.OSFile(path + ".tmp", "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for kind, item in items:
            if kind == "note":
                notes.append(item)
                continue
            batch.append(_record(item, images))
            n += 1
            if len(batch) == BATCH:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
                batch, images = [], {}  # one batch's encoded in-memory images at a time
        if batch:
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
    with open(path + ".json.tmp", "w") as f:
        json.dump({"rows": n, "notes": notes}, f)
    os.replace(path + ".tmp", path)
    os.replace(path + ".json.tmp", path + ".json")
    return Rows.open(path)


def _record(row, images):
    """A checked row as a record of the cache's schema."""
    rec = {k: row.get(k) for k in TEXT if k not in OPTIONAL}
    rec["keywords"] = row["keywords"]
    extra = {k: v for k, v in row.items() if k not in BASE and k not in OPTIONAL}
    for k in OPTIONAL:  # a pseudo-label's fields; one of another type travels in `extra`, as it was
        v = row.get(k)
        fits = isinstance(v, str) if k != "evidence_ids" else isinstance(v, list) and all(
            isinstance(e, str) for e in v)
        if fits:
            rec[k] = v
        elif v is not None:
            extra[k] = v
    image = row["image"]
    if isinstance(image, str):
        rec["image"] = image
        try:
            rec["width"], rec["height"] = image_size(image)
        except DataError as e:
            rec["image_problem"] = f"cannot decode image ({str(e).split(': ', 1)[-1]})"
    else:
        data = image.info.get("medfact_bytes")
        if data is None:  # pixels only (the demo's, a decoded datasets image): PNG, once per image object
            if id(image) not in images:  # the image kept alive with them: its id stays its own
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                images[id(image)] = (image, buf.getvalue())
            data = images[id(image)][1]
        rec["image_bytes"], (rec["width"], rec["height"]) = data, image.size
        rec["image_source"] = image.info.get("medfact_source")  # where it came from, for a decoding error
    if extra:
        rec["extra"] = json.dumps(extra, ensure_ascii=False, default=_jsonable)
    return rec


def _jsonable(value):
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def _row_of(rec):
    """The documented row dict of a cache record."""
    row = {k: rec[k] for k in BASE}
    if rec["image"] is None:
        row["image"], _ = image_from_bytes(rec["image_bytes"], rec["image_source"] or f"{rec['dataset']} image")
    for k in OPTIONAL:
        if rec[k] is not None:
            row[k] = rec[k]
    if rec["extra"]:
        row.update(json.loads(rec["extra"]))
    return row


class _File:
    """A row cache file (Arrow IPC, record batches of BATCH rows), read with pread, never mapped: a row at
    random reads its batch (the last two kept), a scan reads each batch in turn, only the columns asked for.
    Memory holds a batch or two, whatever the file's size (a map would keep every page a scan touched)."""

    def __init__(self, path, num_rows):
        import pyarrow as pa
        self.path, self.num_rows, self.recent = path, num_rows, collections.OrderedDict()
        with pa.OSFile(path) as f:
            self.names = pa.ipc.open_file(f).schema.names
        self._reader = None

    def batch(self, b):
        if b not in self.recent:
            import pyarrow as pa
            if self._reader is None or self._reader[0] != os.getpid():  # a forked process opens its own
                f = pa.OSFile(self.path)
                self._reader = (os.getpid(), f, pa.ipc.open_file(f))
            self.recent[b] = self._reader[2].get_batch(b)
            if len(self.recent) > 2:
                self.recent.popitem(last=False)
        return self.recent[b]

    def scan(self, columns=None):
        """(first row, a RecordBatch of `columns`) for each batch, in order."""
        import pyarrow as pa
        fields = [self.names.index(c) for c in columns] if columns else []
        with pa.OSFile(self.path) as f:
            reader = pa.ipc.open_file(f, options=pa.ipc.IpcReadOptions(included_fields=fields, use_threads=False))
            for b in range(reader.num_record_batches):
                yield b * BATCH, reader.get_batch(b)


class Rows:
    """The rows of one split, read from the row cache file (an Arrow IPC file: data.py's docstring): rows[i] is a
    fresh row dict (editing it edits nothing else), rows[a:b] and rows.select(indices) are Rows over the same
    file, iteration reads a batch at a time, rows.only(*fields) reads those fields alone."""

    def __init__(self, file, path, index=None, columns=None):
        self.file, self.path, self.index, self.columns = file, path, index, columns

    @classmethod
    def open(cls, path):
        with open(path + ".json") as f:
            meta = json.load(f)
        for note in meta["notes"]:  # what the build dropped, renamed or skipped, said at every load
            print(note, file=sys.stderr)
        with contextlib.suppress(OSError):
            os.utime(path)  # last used now: an old version of these rows is deleted a day after its last use
        return cls(_File(path, meta["rows"]), path)

    @property
    def dataset(self):
        """These rows as a datasets.Dataset (the cache's columns; read into memory)."""
        import datasets
        import pyarrow as pa
        with pa.OSFile(self.path) as f:
            ds = datasets.Dataset(datasets.table.InMemoryTable(pa.ipc.open_file(f).read_all()))
        return ds if self.index is None else ds.select(self.index)

    def __len__(self):
        return self.file.num_rows if self.index is None else len(self.index)

    def positions(self):
        """The file rows these rows are, in order."""
        return np.arange(self.file.num_rows) if self.index is None else self.index

    def select(self, indices):
        """Rows i of these, for i in indices (any order, repeats allowed)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        idx = idx % max(len(self), 1)
        return Rows(self.file, self.path, idx if self.index is None else self.index[idx], self.columns)

    def only(self, *columns):
        """The same rows read as dicts of these fields alone (text fields: no image is opened), e.g. for
        statistics over a large split."""
        return Rows(self.file, self.path, self.index, columns)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.select(range(len(self))[i])
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        j = int(i % len(self) if self.index is None else self.index[i])
        batch = self.file.batch(j // BATCH)
        if self.columns is not None:
            batch = batch.select(list(self.columns))
        return self._row(batch.slice(j % BATCH, 1).to_pylist()[0])

    def __iter__(self):
        for batch in self.batches(self.columns):
            yield from (self._row(rec) for rec in batch)

    def _row(self, rec):
        return _row_of(rec) if self.columns is None else rec

    def batches(self, columns=None, size=BATCH):
        """The records (dicts of the cache's columns, all or `columns`), a list per `size` rows, in order: one
        pass over the file, a batch of it at a time. Rows in another order than the file's are collected in that
        pass (a few thousand: each read at random, from its batch)."""
        pos = self.positions()
        if self.index is not None and not bool(np.all(np.diff(pos) >= 0)) and len(pos) <= 4 * BATCH:
            for start in range(0, len(pos), size):
                yield [self._record(int(j), columns) for j in pos[start:start + size]]
            return
        want = np.unique(pos)
        ordered = bool(np.all(np.diff(pos) > 0))  # each row once, in file order: passed on as read
        got, pending = {}, []
        for first, batch in self.file.scan(columns):
            lo, hi = np.searchsorted(want, [first, first + batch.num_rows])
            if hi == lo:
                continue
            recs = batch.take(want[lo:hi] - first).to_pylist() if hi - lo < batch.num_rows else batch.to_pylist()
            if ordered:
                pending += recs
                while len(pending) >= size:
                    yield pending[:size]
                    pending = pending[size:]
            else:
                got.update(zip(want[lo:hi].tolist(), recs))
        if ordered:
            if pending:
                yield pending
            return
        for start in range(0, len(pos), size):
            yield [got[j] for j in pos[start:start + size].tolist()]

    def _record(self, j, columns=None):
        batch = self.file.batch(j // BATCH)
        return (batch.select(list(columns)) if columns else batch).slice(j % BATCH, 1).to_pylist()[0]

    def column(self, name):
        """One column's values, in order (e.g. ids, answers): a list."""
        return [rec[name] for batch in self.batches([name], 8192) for rec in batch]

    def __add__(self, other):
        if isinstance(other, Rows) and other.path == self.path:
            return Rows(self.file, self.path, np.concatenate([self.positions(), other.positions()]), self.columns)
        return list(self) + list(other)

    def __radd__(self, other):
        return list(other) + list(self)

    def __eq__(self, other):  # the same rows, field by field (tests; a list of row dicts compares too)
        return isinstance(other, (Rows, list)) and len(self) == len(other) and list(self) == list(other)

    __hash__ = None

    def __repr__(self):
        return f"Rows({len(self)} of {os.path.basename(self.path)})"


def take(rows, indices):
    """rows[i] for i in indices: Rows over the same table for Rows, a list for a list."""
    return rows.select(indices) if isinstance(rows, Rows) else [rows[i] for i in indices]


def field(rows, name):
    """One field of every row, in order (Rows read the one column, not the rows)."""
    return rows.column(name) if isinstance(rows, Rows) else [r.get(name) for r in rows]


# -----------------------------------------------------------------------------
# the second check, once a stage has its model: each image's header reads and each prompt fits

def check_rows(vlm, rows, skip_bad_rows=False, target=False):
    """The rows whose image header reads and whose prompt fits the model (vlm: a model.VLM), before step 1.

    Each image's size (its header: pixels are decoded only when a batch needs them) goes through the image
    processor's resize rule (vlm.image_tokens), which refuses some shapes (an aspect ratio over 200). With
    target=True (sft.py) the prompt and its target together must fit. vlm=None (retrieve.py, which has no
    model) checks the headers. A bad row raises a one-line DataError naming the source, the row and the
    problem (so no bad row stops a run midway); with skip_bad_rows it is skipped and counted instead. Image
    tokens are never truncated. Rows give Rows back, their token counts cached beside the row cache per
    tokenizer and image processor; a list of row dicts gives a list.
    """
    if isinstance(rows, Rows):
        counts, problems = _counts(vlm, rows, target)
    else:
        counts, problems, sizes = np.zeros((len(rows), 2), dtype=np.int64), {}, {}
        for i, r in enumerate(rows):
            try:
                counts[i] = _count(vlm, _fields(r, sizes), target)
            except DataError as e:
                problems[i] = str(e)
    bad = np.zeros(len(rows), dtype=bool)
    bad[list(problems)] = True
    if vlm is not None:
        bad |= counts[:, 0] > vlm.max_len
    first = None
    for i in np.flatnonzero(bad):
        msg = problems.get(int(i))
        if msg is None:
            r, (n, n_img) = rows[int(i)], counts[i]
            msg = (f"{r.get('dataset')}: row {r.get('id')}: {'prompt and target' if target else 'prompt'} is {n} "
                   f"tokens ({n_img} image tokens), over the model's limit of {vlm.max_len}; image tokens are never "
                   f"truncated: lower --max_pixels or shorten the question")
        if not skip_bad_rows:
            raise DataError(msg)
        first = first or msg
    keep = np.flatnonzero(~bad)
    good = rows.select(keep) if isinstance(rows, Rows) else [rows[i] for i in keep]
    if first and int(os.environ.get("RANK", 0)) == 0:  # every rank checks; one says so (torchrun's RANK)
        print(f"skipped {int(bad.sum())} bad rows of {len(rows)}: first problem: {first}", file=sys.stderr,
              flush=True)
    if len(rows) and not len(good):
        raise DataError(f"{rows[0].get('dataset')}: empty dataset: all {len(rows)} rows are bad")
    return good


def _fields(r, sizes):
    """What the check reads of a row dict: its size from the image header (once per image)."""
    key = image_key(r["image"])
    if key not in sizes:  # only good images are remembered: a bad one names each of its rows
        try:
            sizes[key] = image_size(r["image"])
        except DataError as e:
            where = r["image"] if isinstance(r["image"], str) else r.get("dataset")
            raise DataError(f"{where} (row {r.get('id')}): cannot decode image "
                            f"({str(e).split(': ', 1)[-1]})") from None
    w, h = sizes[key]
    return dict(r, image=r["image"] if isinstance(r["image"], str) else None, width=w, height=h,
                image_problem=None)


def _count(vlm, rec, target):
    """(prompt tokens, of which image tokens) of a record (with target=True, plus the target's), or a
    DataError naming the row."""
    source = rec["image"] or rec.get("dataset")
    if rec["image_problem"]:
        raise DataError(f"{source} (row {rec['id']}): {rec['image_problem']}")
    if vlm is None:
        return 0, 0
    try:
        n, n_img = vlm.prompt_length((rec["width"], rec["height"]), rec["question"])
    except ValueError as e:  # transformers' smart_resize
        raise DataError(f"{source} (row {rec['id']}): the image processor refuses a {rec['width']}x"
                        f"{rec['height']} image ({e})") from None
    if target:
        if not isinstance(rec.get("target"), str):
            raise DataError(f"{rec.get('dataset')}: row {rec['id']}: no 'target' text")
        n += len(vlm.tokenizer(rec["target"], add_special_tokens=False).input_ids) + 1
    return n, n_img


def _counts(vlm, rows, target):
    """Token counts [(n, n_img)] and problems {i: message} of Rows, read from / written to the count cache
    beside the row cache (per table, tokenizer, image processor and target), computed for rows it lacks."""
    sig = _signature(vlm, target)
    path = f"{rows.path}.{sig}.counts" if sig else None
    table = np.full((rows.file.num_rows, 2), -2, dtype=np.int64)  # -2: not counted yet
    bad = {}
    if path and os.path.exists(path + ".npy"):
        with contextlib.suppress(OSError, ValueError):
            table = np.load(path + ".npy")
            with open(path + ".json") as f:
                bad = {int(k): v for k, v in json.load(f).items()}
    pos = rows.positions()
    todo = np.unique(pos[table[pos, 0] == -2])
    if len(todo):
        cols = ["id", "dataset", "question", "image", "width", "height", "image_problem"] + (["target"] if target
                                                                                            else [])
        sub = Rows(rows.file, rows.path, todo)
        for j, rec in zip(todo, (rec for batch in sub.batches(cols) for rec in batch)):
            try:
                table[j] = _count(vlm, rec, target)
            except DataError as e:
                table[j], bad[int(j)] = (-1, 0), str(e)
        if path:  # written whole and renamed: ranks writing at once each leave a whole file
            tmp = f"{path}.{os.getpid()}.tmp"
            np.save(tmp + ".npy", table)
            with open(tmp + ".json", "w") as f:
                json.dump(bad, f)
            os.replace(tmp + ".json", path + ".json")
            os.replace(tmp + ".npy", path + ".npy")
    return table[pos], {i: bad[int(j)] for i, j in enumerate(pos) if int(j) in bad}


def _signature(vlm, target):
    """What a row's token count depends on besides the row: the tokenizer, the image processor, the prompt
    format. None when it cannot be told (a tokenizer without a serialised form): nothing is cached."""
    if vlm is None:
        return "headers"
    backend = getattr(vlm.tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import families
    h = hashlib.sha1(backend.to_str().encode())
    ip = vlm.image_processor
    h.update(json.dumps([type(vlm).__name__, vlm.generic, vlm.merge, getattr(vlm.tokenizer, "chat_template", None),
                         ip.to_json_string() if hasattr(ip, "to_json_string") else repr(ip),
                         families.INSTRUCTION, families.SYSTEM, bool(target)], default=str).encode())
    return h.hexdigest()[:16]

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
    encoded, alive = {}, []

    def image_bytes(row):
        image = row.get("image")
        key = image_key(image)  # a path, the hash of embedded bytes, or the object (kept alive below)
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
                alive.append(image)  # its id stays its own while `encoded` knows it
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
