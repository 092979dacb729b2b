"""
evaluate.py: greedy decoding on a test split -> metrics JSON, its predictions JSONL and a table.

The protocol (the MEDFACT-R1 paper released no evaluation code; this is the common one):
- answers are normalised with rewards.normalize_answer (case, whitespace, punctuation,
  articles, number words) before any comparison.
- the predicted answer is the text of the <answer> block; a completion without one is parsed
  leniently (rewards.parse_answer_lenient: the text after the last <answer> of a cut-off block,
  else the text after the last </think>, else the whole completion without tags), so a model is
  not scored 0 for format alone; `format` says how often the format was right.
- closed questions (yes/no): exact agreement after normalisation -> closed_accuracy.
- open questions: normalised exact match -> open_accuracy, and token recall of the gold answer's
  words in the prediction (the LLaVA-Med convention) -> open_recall, reported separately.
- accuracy = exact-match accuracy over all rows (closed and open).
- format, fact, consistency = the means of the rewards of the same name (rewards.score); fact
  over the rows that carry keywords only (the benchmarks' test rows carry none: fact is null).
- SLAKE: English rows only unless --lang says otherwise. VQA-RAD: the official test rows
  (451: test_freeform + test_para). PathVQA: its test split.
- baselines on the same split, from the same dataset's training split: the majority answer
  (per answer type) and the question-only prior (the most frequent training answer for each
  question string). A model that does not beat them is not reading the image.

Run it:
    python evaluate.py --ckpt runs/grpo --data demo --split test --out runs/eval/metrics.json
    python evaluate.py --ckpt runs/grpo --data ../shared/data/slake --split test --out runs/slake.json
    torchrun --nproc_per_node=8 evaluate.py --ckpt PATH --data vqa-rad --out runs/vqa_rad.json
    (several nodes: torchrun --nnodes=2 --node_rank=R --master_addr=HOST0 --master_port=29500 ...)
    python evaluate.py --ckpt PATH --data huge.parquet --stream 4096   # no row cache, no baselines
Writes FILE.predictions.jsonl (one line per row: the completion, the answer and its scores), then
FILE.json: {"dataset", "split", "n", "accuracy", "closed_accuracy", "open_accuracy", "open_recall",
"format", "fact", "consistency", "by_category", "predictions" (that file's name), "baselines", ...},
each in [0, 1] or null when no row applies. Both are on disk before the baselines run; FILE.json is
then rewritten with them, so a failure there (one line) loses nothing else. Two evaluations into one
folder (sft.json, grpo.json) keep two predictions files, and paired(a, b) takes either metrics JSON
(or a folder: its metrics.json). --out is checked before anything else runs (a folder, a path under
a file or one it cannot write: one line), and each batch's images are decoded when its turn comes:
memory does not grow with the split (bench/eval_memory.py; docs/EXPERIMENTS.md, part 3).
"""

import argparse
import collections
import copy
import json
import math
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import model as M
import rewards
from common import SetupError, default_dtype, init_dist

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
# data
parser.add_argument("--data", default="demo", help="demo | vqa-rad | slake | pathvqa | folder | JSONL")
parser.add_argument("--split", default="test", help="the split to evaluate (train, val, test)")
parser.add_argument("--lang", default="en", help="SLAKE language: en | zh | all")
parser.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only")
parser.add_argument("--skip_bad_rows", action="store_true", help="skip (and count) bad rows instead of failing")
parser.add_argument("--no_baselines", action="store_true", help="skip the majority / question-only baselines")
parser.add_argument("--stream", type=int, default=0, metavar="N",
                    help="read the split N rows at a time without the row cache (data.stream): for a set larger than "
                         "a disk cache should hold; no baselines")
# model
parser.add_argument("--ckpt", "--model", dest="ckpt", default="runs/grpo",
                    help="checkpoint folder (sft.py / grpo.py output), tiny, or a hub name")
parser.add_argument("--max_pixels", type=int, default=None, help="cap image resolution (pixels), as in training")
parser.add_argument("--max_new_tokens", type=int, default=128, help="greedy decoding stops here at the latest")
parser.add_argument("--batch_size", type=int, default=64, help="prompts decoded together, per process")
parser.add_argument("--trust_remote_code", action="store_true", help="run a checkpoint's own Python code")
# output
parser.add_argument("--out", default="runs/eval/metrics.json",
                    help="metrics JSON; its predictions go beside it: X.json -> X.predictions.jsonl")
parser.add_argument("--device", default="auto", help="auto (cuda, mps, cpu) or a torch device")
parser.add_argument("--quiet", action="store_true", help="no progress bar and no table")


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def grade(completion, row):
    """One row's scores: exact match, open recall, and the four rewards."""
    # lenient: a model that answers right without the tags is still right here; `format` says how often
    pred = rewards.parse_answer_lenient(completion)
    gold = row["answer"]
    s = rewards.score(completion, row)
    return {"pred": pred, "exact": float(rewards.exact_match(completion, gold)),
            "recall": rewards.open_recall(pred, gold) if row["answer_type"].strip().lower() == "open" else None,
            "format": s["format"], "fact": s["fact"] if row.get("keywords") else None,  # no keywords: not scored
            "consistency": s["consistency"]}


def summarize(rows, graded):
    """The metrics JSON's numbers; each a mean over the rows it applies to, None when none does."""
    closed = [g for r, g in zip(rows, graded) if r["answer_type"] == "closed"]
    open_ = [g for r, g in zip(rows, graded) if r["answer_type"] == "open"]
    out = {"n": len(rows), "accuracy": mean(g["exact"] for g in graded),
           "closed_accuracy": mean(g["exact"] for g in closed), "open_accuracy": mean(g["exact"] for g in open_),
           "open_recall": mean(g["recall"] for g in open_), "format": mean(g["format"] for g in graded),
           "fact": mean(g["fact"] for g in graded if g["fact"] is not None),
           "consistency": mean(g["consistency"] for g in graded)}
    cats = collections.defaultdict(list)
    for r, g in zip(rows, graded):
        if r.get("category"):
            cats[r["category"]].append(g["exact"])
    out["by_category"] = {c: {"n": len(v), "accuracy": mean(v)} for c, v in sorted(cats.items())}
    return out


def question_grams(question):
    """The words and word bigrams of a normalised question: the question-only classifier's features."""
    words = rewards.normalize_answer(question).split()
    return set(words) | {f"{a} {b}" for a, b in zip(words, words[1:])}


def question_classifier(train_rows, val_rows=None, lambdas=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
                        max_features=4096, chunk=1024):
    """A trained question-only model: ridge regression from a question's words and bigrams (binary, unit
    norm; those seen in at least two training questions, the max_features most frequent) onto one-hot
    training answers, predicting the best-scoring answer of the row's answer type. The regularisation is
    chosen on `val_rows` (None: every 10th training row is held out for it, then the model is refit on
    all). Closed form through one eigendecomposition of X'X, so every lambda costs a matrix product:
    deterministic, seconds on a CPU. X'X (d, d) and X'Y (d, answers) are summed from each row's few
    nonzeros and rows are scored `chunk` at a time, so memory does not grow with the rows (a dense X costs
    32 KB a row, and a one-hot Y 8 bytes per answer a row). Returns predict(row) -> normalised answer,
    with .lam the choice and .many(rows) -> [answer], the same for many rows at once."""
    import numpy as np
    norm = rewards.normalize_answer
    if val_rows is None:
        val_rows = train_rows[9::10]
        fit_rows = data.take(train_rows, [i for i in range(len(train_rows)) if i % 10 != 9])
    else:
        fit_rows = train_rows
    counts = collections.Counter(g for r in train_rows for g in question_grams(r["question"]))
    vocab = sorted((g for g, c in counts.items() if c >= 2), key=lambda g: (-counts[g], g))[:max_features]
    index = {g: i for i, g in enumerate(vocab)}
    d = len(vocab) + 1  # the grams and a constant
    answers = sorted({norm(r["answer"]) for r in train_rows})
    column = {a: j for j, a in enumerate(answers)}
    allowed = {}  # answer type -> the answers seen with it in training (a closed question gets a closed answer)
    for r in train_rows:
        allowed.setdefault(r["answer_type"], set()).add(column[norm(r["answer"])])
    masks = {t: np.isin(np.arange(len(answers)), sorted(js)) for t, js in allowed.items()}
    anything = np.ones(len(answers), dtype=bool)  # an answer type unseen in training: no mask

    def nonzeros(row):  # a row of X as (columns, values): its grams at unit norm, then the constant 1
        cols = sorted({index[g] for g in question_grams(row["question"]) if g in index})
        values = np.full(len(cols) + 1, 1.0 / max(math.sqrt(len(cols)), 1.0))
        values[-1] = 1.0
        return np.array(cols + [d - 1]), values

    def features(rows):  # (len(rows), d): X for one chunk of rows
        x = np.zeros((len(rows), d))
        for i, r in enumerate(rows):
            cols, values = nonzeros(r)
            x[i, cols] = values
        return x

    def fit(rows):  # the eigendecomposition of X'X, and Q'X'Y
        xtx, xty = np.zeros((d, d)), np.zeros((d, len(answers)))
        for r in rows:
            cols, values = nonzeros(r)
            xtx[np.ix_(cols, cols)] += np.outer(values, values)
            xty[cols, column[norm(r["answer"])]] += values  # Y is one-hot: the row adds to its answer's column
        e, q = np.linalg.eigh(xtx)
        return e, q, q.T @ xty

    def predictions(model, lams, rows):  # {lam: [answer per row]}, scoring `chunk` rows at a time
        e, q, qty = model
        out = {lam: [] for lam in lams}
        for i in range(0, len(rows), chunk):
            part = rows[i:i + chunk]
            xq = features(part) @ q  # (chunk, d)
            mask = np.array([masks.get(r["answer_type"], anything) for r in part])  # (chunk, answers)
            for lam in lams:
                scores = xq @ (qty / (e + lam)[:, None])  # X (X'X + lam I)^-1 X'Y: (chunk, answers)
                out[lam] += [answers[j] for j in np.where(mask, scores, -np.inf).argmax(axis=1)]
        return out

    model = fit(fit_rows)
    gold = [norm(r["answer"]) for r in val_rows]
    right = {lam: sum(p == g for p, g in zip(ps, gold)) for lam, ps in predictions(model, lambdas, val_rows).items()}
    lam = max(lambdas, key=lambda l: (right[l], l)) if val_rows else 1.0  # ties: the smoother model
    if fit_rows is not train_rows:
        model = fit(train_rows)

    def predict(row):
        return predictions(model, [lam], [row])[lam][0]
    predict.lam, predict.many = lam, lambda rows: predictions(model, [lam], rows)[lam]
    return predict


def baselines(train_rows, rows, val_rows=None):
    """Accuracy on `rows` of models that never look at the image, learnt from `train_rows` and scored like
    the model (normalised exact match): "majority", the most frequent training answer of the row's answer
    type; "question_only", the most frequent training answer of the same (normalised) question string, else
    the majority answer; "question_trained", the question_classifier (a text classifier over the training
    answers, regularised on `val_rows`), the VQA literature's question-only prior; "closed_majority", the
    majority answer's accuracy on the closed questions alone (what closed_accuracy must beat). The
    project's one baseline function (demo.py and synthetic_cxr.py print it too). strongest_prior(b) is
    the question-only number a model must beat."""
    norm = rewards.normalize_answer
    train_rows, rows = light(train_rows), light(rows)
    val_rows = light(val_rows) if val_rows is not None else None
    asked = {norm(r["question"]) for r in rows}  # the lookup counts only these: memory does not grow with train
    by_type, by_question = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
    for r in train_rows:
        by_type[r["answer_type"]][norm(r["answer"])] += 1
        if norm(r["question"]) in asked:
            by_question[norm(r["question"])][norm(r["answer"])] += 1

    def majority(r):
        c = by_type.get(r["answer_type"])
        return c.most_common(1)[0][0] if c else ""

    def prior(r):
        c = by_question.get(norm(r["question"]))
        return c.most_common(1)[0][0] if c else majority(r)

    guesses = {"majority": [majority(r) for r in rows], "question_only": [prior(r) for r in rows]}
    guesses["question_trained"] = (question_classifier(train_rows, val_rows).many(rows) if train_rows
                                   else guesses["majority"])
    gold = [norm(r["answer"]) for r in rows]
    out = {name: mean(float(p == g) for p, g in zip(ps, gold)) for name, ps in guesses.items()}
    out["closed_majority"] = mean(float(p == g) for p, g, r in zip(guesses["majority"], gold, rows)
                                  if r["answer_type"] == "closed")
    return out


def light(rows):
    """Rows read as their question, answer and answer type alone (no image opened): a baseline's view."""
    return rows.only("question", "answer", "answer_type") if isinstance(rows, data.Rows) else rows


def strongest_prior(b):
    """The best question-only baseline in a baselines() dict (the lookup, or the trained classifier)."""
    return max(v for k, v in b.items() if k in ("question_only", "question_trained") and v is not None)


def predictions_file(out):
    """Where the predictions of metrics JSON `out` go: named after it, so two evaluations into one folder
    (sft.json, grpo.json) keep two files. runs/x/metrics.json -> runs/x/metrics.predictions.jsonl."""
    return (out[:-len(".json")] if out.endswith(".json") else out) + ".predictions.jsonl"


def find_predictions(path):
    """The predictions file of an evaluation, given its metrics JSON or the folder holding metrics.json: the
    file that JSON names, else predictions.jsonl beside it (evaluations before #34 wrote that name)."""
    metrics = os.path.join(path, "metrics.json") if os.path.isdir(path) else path
    name = "predictions.jsonl"
    if os.path.isfile(metrics):
        with open(metrics) as f:
            name = json.load(f).get("predictions", name)
    return os.path.join(os.path.dirname(metrics), name)


def paired(before, after):
    """Two models on the same questions (each a metrics JSON or its folder; their predictions matched by row
    id): how many answers the second fixed and broke, and the exact two-sided McNemar p-value: is the change
    more than chance?"""
    read = lambda p: {r["id"]: r["exact"] for _, r, _ in data.read_jsonl(find_predictions(p))}
    a, b = read(before), read(after)
    fixed = sum(1 for k in a if not a[k] and b.get(k))
    broken = sum(1 for k in a if a[k] and not b.get(k))
    return {"fixed": fixed, "broken": broken, "p": round(mcnemar(fixed, broken), 6)}


def mcnemar(fixed, broken):
    """The exact two-sided McNemar p-value of `fixed` answers fixed and `broken` broken: under "no change"
    each flip is a fix or a break with probability 1/2, so a binomial tail, doubled."""
    n = fixed + broken
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(fixed, broken) + 1)) / 2 ** n) if n else 1.0


def fmt(x):
    return "  -  " if x is None else f"{x:.3f}"


def print_table(res):
    keys = ["accuracy", "closed_accuracy", "open_accuracy", "open_recall", "format", "fact", "consistency"]
    print(f"\n{res['dataset']} / {res['split']}  n={res['n']}  ckpt={res['ckpt']}")
    print(" | ".join(f"{k:>15}" for k in keys))
    print(" | ".join(f"{fmt(res[k]):>15}" for k in keys))
    for name, v in (res.get("baselines") or {}).items():
        print(f"baseline {name:>14}: accuracy {fmt(v)}")
    for c, v in res["by_category"].items():
        print(f"  {c:>14}: {fmt(v['accuracy'])} (n={v['n']})")


def evaluate(vlm, rows, batch_size=64, max_new_tokens=128, progress=True, images=None):
    """Greedy completions and graded rows for `rows` (this rank's share). Each batch's images are decoded
    when its turn comes, so memory does not grow with the split (all at once: 12.6 GB on 6,719 questions)."""
    # a small cache of fitted images: a question's image is often another's, and memory stays bounded
    images = images or data.ImageCache(vlm.fit_image, max_bytes=256 * 2 ** 20)
    completions = []
    for i in tqdm(range(0, len(rows), batch_size), disable=not progress, desc="evaluate", leave=False):
        batch = rows[i:i + batch_size]
        completions += M.generate(vlm, [images(r) for r in batch], [r["question"] for r in batch],
                                  max_new_tokens, batch_size)
    return completions, [grade(c, r) for c, r in zip(completions, rows)]


def write_json(path, res):
    """PATH.tmp, then renamed over PATH: a kill never leaves half a metrics file."""
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)


def reference_baselines(args, rows):
    """baselines() of the evaluated rows from the dataset's training split, or None and one printed line. A
    reference line, not the result: a bad training row skips, a missing split only warns, and any failure
    (a MemoryError too) leaves the metrics and predictions already written."""
    try:
        train = data.load(args.data, "train", lang=args.lang, skip_bad_rows=True)
        val = None  # the trained baseline's regularisation: chosen on val (else on a slice of train)
        if args.split != "val":
            try:
                val = data.load(args.data, "val", lang=args.lang, skip_bad_rows=True) or None
            except (data.DataError, FileNotFoundError):
                pass
        return baselines(train, rows, val)
    except (data.DataError, FileNotFoundError) as e:
        print(f"baselines skipped: {e}")
    except Exception as e:  # a MemoryError too: whatever goes wrong here, the run's own results stay
        print(f"baselines failed ({e!r}); {args.out} has the metrics without them")
    return None


def held_out_scores(vlm, rows, max_new_tokens, rank, world, device, images=data.load_image, fsdp=False):
    """grpo.py's held-out model selection: greedy scores on `rows`, this module's metrics, shared over ranks:
    {"val_accuracy", "val_open_accuracy", "val_open_recall"} (the open ones None when no row is open).
    Decoded as this script will score the saved model, in the dtype it loads it in (bf16 on CUDA): an fp32
    policy through a copy in that dtype (under FSDP, which shards an fp32 policy, through bf16 autocast)."""
    vlm.model.eval()
    mine, n = rows[rank::world], math.ceil(len(rows) / world)
    padded = (list(mine) + [rows[0]] * n)[:n]  # as many forwards on every rank (FSDP), the repeats not scored
    scored, autocast, dtype = vlm, torch.autocast(device.type, enabled=False), default_dtype(device)
    if next(vlm.model.parameters()).dtype != dtype and fsdp:
        autocast = torch.autocast(device.type, dtype=dtype)
    elif next(vlm.model.parameters()).dtype != dtype:
        scored = copy.copy(vlm)
        scored.model = copy.deepcopy(vlm.model).to(dtype)
    with autocast:
        texts = M.generate(scored, [images(r) for r in padded], [r["question"] for r in padded],
                           max_new_tokens, batch_size=64)[:len(mine)]
    graded = [grade(t, r) for t, r in zip(texts, mine)]
    open_ = [g for g in graded if g["recall"] is not None]  # grade gives open rows a recall
    sums = torch.tensor([sum(g["exact"] for g in graded), len(graded), sum(g["exact"] for g in open_),
                         sum(g["recall"] for g in open_), len(open_)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(sums)
    vlm.model.train()
    exact, n, open_exact, open_recall, n_open = sums.tolist()
    return {"val_accuracy": exact / n, "val_open_accuracy": open_exact / n_open if n_open else None,
            "val_open_recall": open_recall / n_open if n_open else None}


def decode(vlm, rows, args, rank, world):
    """(rows, completions, graded) of checked rows, decoded in strided shards and gathered in order on rank 0."""
    rows = data.check_rows(vlm, rows, args.skip_bad_rows)  # images read and prompts fit, before any decoding
    mine = list(range(rank, len(rows), world))
    with torch.no_grad():
        completions, graded = evaluate(vlm, data.take(rows, mine), args.batch_size, args.max_new_tokens,
                                       progress=rank == 0 and not args.quiet and not args.stream)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (mine, completions, graded))
        order = sorted((i, c, g) for m, cs, gs in parts for i, c, g in zip(m, cs, gs))
        completions, graded = [c for _, c, _ in order], [g for _, _, g in order]
    return rows, completions, graded


def prediction_lines(rows, completions, graded):
    # one line per row, in the rows' order: what paired() and bench/demo_flips.py compare
    return ({"id": r.get("id"), "question": r["question"], "gold": r["answer"], "answer_type": r["answer_type"],
             "category": r.get("category"), "completion": c, **g} for r, c, g in zip(rows, completions, graded))


def streamed(vlm, args, rank, world, predictions):
    """--stream N: the split read N rows at a time (data.stream, no cache), each part's predictions appended as it
    is decoded; returns what summarize() reads of each row, and every row's grades."""
    kept, graded, source = [], [], data.stream(args.data, args.split, lang=args.lang,
                                               skip_bad_rows=args.skip_bad_rows, limit=args.limit)
    with open(predictions + ".tmp", "w") as f:
        for part in tqdm(iter(lambda: [r for _, r in zip(range(args.stream), source)], []),
                         disable=rank != 0 or args.quiet, desc=f"evaluate ({args.stream} rows a part)"):
            rows, completions, grades = decode(vlm, part, args, rank, world)
            if rank == 0:
                f.writelines(data.jsonl_line(p) for p in prediction_lines(rows, completions, grades))
                kept += [{"answer_type": r["answer_type"], "category": r.get("category"), "dataset": r["dataset"]}
                         for r in rows]
                graded += grades
    if rank == 0:
        os.replace(predictions + ".tmp", predictions)
    return kept, graded


def main(args):
    rank, world, device = init_dist(args.device)
    t0 = time.time()
    # --out first: a folder or a read-only path found after the last answer would lose them all
    predictions = predictions_file(args.out)
    data.writable_file(args.out)
    data.writable_file(predictions, flag="--out's predictions file")
    rows = None if args.stream else data.load(args.data, args.split, lang=args.lang,
                                              skip_bad_rows=args.skip_bad_rows, limit=args.limit)
    vlm = M.load(args.ckpt, device=device, texts=data.tokenizer_texts, max_pixels=args.max_pixels,
                 trust_remote_code=args.trust_remote_code)
    vlm.model.eval()
    if args.stream:
        rows, graded = streamed(vlm, args, rank, world, predictions)
    else:
        rows, completions, graded = decode(vlm, rows, args, rank, world)
        if rank == 0:  # the answers go to disk before the baselines run: a failure there must not lose the decoding
            data.write_jsonl(predictions, prediction_lines(rows, completions, graded))
    if rank == 0:
        res = {"dataset": rows[0]["dataset"] if rows else args.data, "split": args.split, "ckpt": args.ckpt,
               **summarize(rows, graded), "predictions": os.path.basename(predictions), "seconds": time.time() - t0}
        write_json(args.out, res)
        b = None if args.no_baselines or args.stream else reference_baselines(args, rows)
        if b is not None:
            res.update(baselines=b, seconds=time.time() - t0)
            write_json(args.out, res)  # again, with them
        if not args.quiet:
            print_table(res)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(parser.parse_args())
    except (data.DataError, SetupError) as e:  # bad input, model folder or --out: one line, no traceback
        raise SystemExit(f"error: {e}")
