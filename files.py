"""
files.py: the files users give and runs write: the one-line DataError, the one JSONL writer and reader, and
the check that an --out can be written before any work.

One pair of functions writes and reads every JSONL file of the project (pseudo-labels, metrics, rollouts,
predictions, users' rows): jsonl_line / append_jsonl / write_jsonl and read_jsonl. Lines end at "\n" only
(never at U+2028, which JSON allows inside a string, and which str.splitlines() breaks at); cut_torn_line and
truncate_jsonl let a resumed run tolerate a last line a crash or a full disk left half written.
writable_file and writable_folder check an --out before any work. Standard library only.
"""

import json
import os
import sys
import tempfile


class DataError(ValueError):
    """Bad input: a row, a file or a path the user gave. The message is one line naming the file, the row and
    the problem (any line break in it, U+2028 included, becomes a space)."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).splitlines()))


class SplitNotFound(DataError):
    """The source has no such split, or no rows in it: unlike a bad row, something a caller may do without."""


def short(value, n=60):
    """A value as it reads in a one-line error: repr, cut to about n characters."""
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def text_problem(field, value, optional=False):
    """What is wrong with a text field (a str), or None. Text must be a str that UTF-8 can write: JSON's
    "\\ud800" escape makes a lone surrogate, which no tokenizer and no file write accepts."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        return f"{field} must be text, not {type(value).__name__} {short(value)}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{field} is not valid Unicode (a lone surrogate, as JSON's \\ud800 escape makes)"
    return None


def read_text(path):
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


def parse_json(text):
    """(the value, None) or (None, what is wrong). Python's json also raises ValueError for an integer of over
    4,300 digits and RecursionError for brackets nested thousands deep: both are bad input, not a crash."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg})"
    except (ValueError, RecursionError) as e:
        return None, f"invalid JSON ({type(e).__name__}: {str(e)[:80]})"


def read_json(path):
    text = read_text(path)
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
    """[(line number, the record, None) or (line number, None, what is wrong with the line)] of a JSONL file
    (iter_jsonl, as a list)."""
    return list(iter_jsonl(path))


def iter_jsonl(path):
    """(line number, the record, None) or (line number, None, what is wrong with the line), a line at a time:
    memory does not grow with the file.

    Lines end at "\\n", "\\r\\n" or "\\r" (JSON escapes both inside a string), never at U+2028, U+2029 or
    U+0085, where str.splitlines() also breaks: JSON allows them raw inside a string. A byte-order mark and
    blank lines are fine; a line that is not UTF-8 is a DataError naming it.
    """
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    n = 0
    with f:
        _check_utf8(f, path)
        for raw in f:
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            raw = raw[:-1] if raw.endswith(b"\r") else raw
            for part in raw.split(b"\r"):  # a lone "\r" ends a line too
                n += 1
                if n == 1 and part.startswith(b"\xef\xbb\xbf"):
                    part = part[3:]
                try:
                    line = part.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: line {n}: not UTF-8 ({e.reason} at byte {e.start})") from None
                if line.strip():
                    value, problem = parse_json(line)
                    yield n, value, problem


def _check_utf8(f, path):
    """A file that is not UTF-8 is refused whole, before its first row, with the line of the first bad byte."""
    import codecs
    decoder, line, at = codecs.getincrementaldecoder("utf-8")(), 1, 0
    for block in iter(lambda: f.read(1 << 20), b""):
        try:
            decoder.decode(block)
        except UnicodeDecodeError as e:
            line += block.count(b"\n", 0, max(e.start, 0))
            raise DataError(f"{path}: line {line}: not UTF-8 ({e.reason} at byte {at + max(e.start, 0)})") from None
        line, at = line + block.count(b"\n"), at + len(block)
    f.seek(0)


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
            _, problem = parse_json(data[start:].decode("utf-8"))
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
