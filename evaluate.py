"""
evaluate.py: greedy decoding on a test split -> metrics JSON, predictions.jsonl and a table.

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
Writes FILE.json: {"dataset", "split", "n", "accuracy", "closed_accuracy", "open_accuracy",
"open_recall", "format", "fact", "consistency", "by_category", "baselines", ...}, each in [0, 1]
or null when no row applies, and predictions.jsonl in the same folder. --out is checked before
anything else runs (a folder, a path under a file or one it cannot write: one line), and each
batch's images are decoded when its turn comes: memory does not grow with the split
(bench/eval_memory.py; docs/EXPERIMENTS.md, part 3).
"""

import argparse
import collections
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
from common import SetupError, init_dist

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
# data
parser.add_argument("--data", default="demo", help="demo | vqa-rad | slake | pathvqa | folder | JSONL")
parser.add_argument("--split", default="test", help="the split to evaluate (train, val, test)")
parser.add_argument("--lang", default="en", help="SLAKE language: en | zh | all")
parser.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only")
parser.add_argument("--skip_bad_rows", action="store_true", help="skip (and count) bad rows instead of failing")
parser.add_argument("--no_baselines", action="store_true", help="skip the majority / question-only baselines")
# model
parser.add_argument("--ckpt", "--model", dest="ckpt", default="runs/grpo",
                    help="checkpoint folder (sft.py / grpo.py output), tiny, or a hub name")
parser.add_argument("--max_pixels", type=int, default=None, help="cap image resolution (pixels), as in training")
parser.add_argument("--max_new_tokens", type=int, default=128, help="greedy decoding stops here at the latest")
parser.add_argument("--batch_size", type=int, default=64, help="prompts decoded together, per process")
parser.add_argument("--trust_remote_code", action="store_true", help="run a checkpoint's own Python code")
# output
parser.add_argument("--out", default="runs/eval/metrics.json",
                    help="metrics JSON; predictions.jsonl goes to the same folder")
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


def question_classifier(train_rows, val_rows=None, lambdas=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0), max_features=4096):
    """A trained question-only model: ridge regression from a question's words and bigrams (binary, unit
    norm; those seen in at least two training questions, the max_features most frequent) onto one-hot
    training answers, predicting the best-scoring answer of the row's answer type. The regularisation is
    chosen on `val_rows` (None: every 10th training row is held out for it, then the model is refit on
    all). Closed form through one eigendecomposition of X'X, so every lambda costs a matrix product:
    deterministic, seconds on a CPU. Returns predict(row) -> normalised answer, with .lam the choice."""
    import numpy as np
    norm = rewards.normalize_answer
    if val_rows is None:
        val_rows = train_rows[9::10]
        fit_rows = [r for i, r in enumerate(train_rows) if i % 10 != 9]
    else:
        fit_rows = train_rows
    counts = collections.Counter(g for r in train_rows for g in question_grams(r["question"]))
    vocab = sorted((g for g, c in counts.items() if c >= 2), key=lambda g: (-counts[g], g))[:max_features]
    index = {g: i for i, g in enumerate(vocab)}
    answers = sorted({norm(r["answer"]) for r in train_rows})
    column = {a: j for j, a in enumerate(answers)}
    allowed = {}  # answer type -> the answers seen with it in training (a closed question gets a closed answer)
    for r in train_rows:
        allowed.setdefault(r["answer_type"], set()).add(column[norm(r["answer"])])
    masks = {t: np.isin(np.arange(len(answers)), sorted(js)) for t, js in allowed.items()}

    def features(rows):  # (n, d + 1): the grams, unit norm, and a constant
        x = np.zeros((len(rows), len(vocab) + 1))
        for i, r in enumerate(rows):
            x[i, [index[g] for g in question_grams(r["question"]) if g in index]] = 1.0
            x[i, :-1] /= max(np.linalg.norm(x[i, :-1]), 1.0)
            x[i, -1] = 1.0
        return x

    def fit(rows):  # the eigendecomposition of X'X, and X'Y
        x = features(rows)
        y = np.zeros((len(rows), len(answers)))
        y[np.arange(len(rows)), [column[norm(r["answer"])] for r in rows]] = 1.0
        e, q = np.linalg.eigh(x.T @ x)
        return e, q, q.T @ (x.T @ y)

    def predictions(model, lam, x, rows):
        e, q, qty = model
        scores = (x @ q) @ (qty / (e + lam)[:, None])  # X (X'X + lam I)^-1 X'Y
        out = []
        for s, r in zip(scores, rows):
            mask = masks.get(r["answer_type"])
            s = np.where(mask, s, -np.inf) if mask is not None else s
            out.append(answers[int(np.argmax(s))])
        return out

    model, x_val = fit(fit_rows), features(val_rows)
    gold = [norm(r["answer"]) for r in val_rows]
    score = lambda lam: sum(p == g for p, g in zip(predictions(model, lam, x_val, val_rows), gold))
    lam = max(lambdas, key=lambda l: (score(l), l)) if val_rows else 1.0  # ties: the smoother model
    if fit_rows is not train_rows:
        model = fit(train_rows)

    def predict(row):
        return predictions(model, lam, features([row]), [row])[0]
    predict.lam = lam
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
    by_type, by_question = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
    for r in train_rows:
        by_type[r["answer_type"]][norm(r["answer"])] += 1
        by_question[norm(r["question"])][norm(r["answer"])] += 1

    def majority(r):
        c = by_type.get(r["answer_type"])
        return c.most_common(1)[0][0] if c else ""

    def prior(r):
        c = by_question.get(norm(r["question"]))
        return c.most_common(1)[0][0] if c else majority(r)

    trained = question_classifier(train_rows, val_rows) if train_rows else majority
    out = {name: mean(float(f(r) == norm(r["answer"])) for r in rows)
           for name, f in (("majority", majority), ("question_only", prior), ("question_trained", trained))}
    out["closed_majority"] = mean(float(majority(r) == norm(r["answer"])) for r in rows if r["answer_type"] == "closed")
    return out


def strongest_prior(b):
    """The best question-only baseline in a baselines() dict (the lookup, or the trained classifier)."""
    return max(v for k, v in b.items() if k in ("question_only", "question_trained") and v is not None)


def paired(before_dir, after_dir):
    """Two models on the same questions (their predictions.jsonl, matched by row id): how many answers
    the second fixed and broke, and the exact two-sided McNemar p-value: is the change more than chance?"""
    read = lambda d: {r["id"]: r["exact"] for _, r, _ in data.read_jsonl(os.path.join(d, "predictions.jsonl"))}
    a, b = read(before_dir), read(after_dir)
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


def main(args):
    rank, world, device = init_dist(args.device)
    t0 = time.time()
    # --out first: a folder or a read-only path found after the last answer would lose them all
    predictions = os.path.join(os.path.dirname(os.path.abspath(args.out)), "predictions.jsonl")
    data.writable_file(args.out)
    data.writable_file(predictions, flag="--out's predictions.jsonl")
    rows = data.load(args.data, args.split, lang=args.lang, skip_bad_rows=args.skip_bad_rows, limit=args.limit)
    vlm = M.load(args.ckpt, device=device, texts=data.tokenizer_texts, max_pixels=args.max_pixels,
                 trust_remote_code=args.trust_remote_code)
    vlm.model.eval()
    rows = data.check_rows(vlm, rows, args.skip_bad_rows)  # images decode and prompts fit, before any decoding
    mine = list(range(rank, len(rows), world))  # strided shards, gathered back in order on rank 0
    with torch.no_grad():
        completions, graded = evaluate(vlm, [rows[i] for i in mine], args.batch_size, args.max_new_tokens,
                                       progress=rank == 0 and not args.quiet)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (mine, completions, graded))
        order = sorted((i, c, g) for m, cs, gs in parts for i, c, g in zip(m, cs, gs))
        completions, graded = [c for _, c, _ in order], [g for _, _, g in order]
    if rank == 0:
        res = {"dataset": rows[0]["dataset"] if rows else args.data, "split": args.split, "ckpt": args.ckpt,
               **summarize(rows, graded)}
        if not args.no_baselines:
            try:  # a reference line, not the result: a bad training row skips, a missing split only warns
                train = data.load(args.data, "train", lang=args.lang, skip_bad_rows=True)
                val = None  # the trained baseline's regularisation: chosen on val (else on a slice of train)
                if args.split != "val":
                    try:
                        val = data.load(args.data, "val", lang=args.lang, skip_bad_rows=True) or None
                    except (data.DataError, FileNotFoundError):
                        pass
                res["baselines"] = baselines(train, rows, val)
            except (data.DataError, FileNotFoundError) as e:
                print(f"baselines skipped: {e}")
        res["seconds"] = time.time() - t0
        with open(args.out + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
        # one line per row, in the rows' order: what bench/demo_flips.py and demo.py's paired test compare
        data.write_jsonl(predictions, ({"id": r.get("id"), "question": r["question"], "gold": r["answer"],
                                        "answer_type": r["answer_type"], "category": r.get("category"),
                                        "completion": c, **g} for r, c, g in zip(rows, completions, graded)))
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
