"""evaluate.py's outputs and its question-only classifier: the metrics and predictions are on disk before the
baselines run (a failure there, a MemoryError too, loses neither); each --out gets its own predictions file,
and paired() compares the files its metrics JSONs name; the classifier equals a dense closed-form ridge, in
memory that does not grow with the training rows."""
import collections
import json
import os
import tracemalloc

import numpy as np
import pytest

import evaluate
import rewards


def run_eval(monkeypatch, out, right, *flags):
    """evaluate.main with the tiny model on 4 demo test rows, the decoding scripted: row i answered right
    (its gold answer) when right[i], else wrong."""
    def decode(vlm, rows, *args, **kwargs):
        completions = [f"<think>I look.</think><answer>{r['answer'] if ok else 'zzz'}</answer>"
                       for r, ok in zip(rows, right)]
        return completions, [evaluate.grade(c, r) for c, r in zip(completions, rows)]
    monkeypatch.setattr(evaluate, "evaluate", decode)
    evaluate.main(evaluate.parser.parse_args(["--ckpt", "tiny", "--data", "demo", "--limit", "4", "--device", "cpu",
                                              "--quiet", "--out", str(out), *flags]))


def exact(path):
    return [json.loads(line)["exact"] for line in path.read_text().splitlines()]


# -----------------------------------------------------------------------------
# the order: the run's own results first, the baselines after


def test_metrics_and_predictions_are_on_disk_before_the_baselines_run(tmp_path, monkeypatch):
    out, predictions = tmp_path / "metrics.json", tmp_path / "metrics.predictions.jsonl"
    on_disk = []

    def baselines(train_rows, rows, val_rows=None):
        on_disk.append((out.exists(), predictions.exists()))
        return {"majority": 0.25}
    monkeypatch.setattr(evaluate, "baselines", baselines)
    run_eval(monkeypatch, out, [1, 0, 1, 1])
    assert on_disk == [(True, True)]
    res = json.loads(out.read_text())  # rewritten with the baselines, atomically (no .tmp left)
    assert res["accuracy"] == 0.75 and res["baselines"] == {"majority": 0.25}
    assert exact(predictions) == [1, 0, 1, 1] and sorted(os.listdir(tmp_path)) == [out.name, predictions.name]


def test_a_failure_in_the_baselines_keeps_the_metrics_and_predictions(tmp_path, monkeypatch, capsys):
    out = tmp_path / "metrics.json"

    def baselines(train_rows, rows, val_rows=None):
        raise MemoryError("Unable to allocate 604. MiB for an array with shape (19755, 4097)")
    monkeypatch.setattr(evaluate, "baselines", baselines)
    run_eval(monkeypatch, out, [1, 0, 1, 1])  # no exception: the decoding run is not lost
    res = json.loads(out.read_text())
    assert res["accuracy"] == 0.75 and "baselines" not in res and res["predictions"] == "metrics.predictions.jsonl"
    assert exact(tmp_path / "metrics.predictions.jsonl") == [1, 0, 1, 1]
    said = [line for line in capsys.readouterr().out.splitlines() if "baselines" in line]
    assert len(said) == 1 and "MemoryError" in said[0] and str(out) in said[0]


# -----------------------------------------------------------------------------
# one predictions file per --out; paired() on metrics JSONs or folders


def test_two_evaluations_into_one_folder_keep_their_own_predictions(tmp_path, monkeypatch):
    sft, grpo = tmp_path / "sft.json", tmp_path / "grpo.json"
    run_eval(monkeypatch, sft, [0, 1, 0, 1], "--no_baselines")
    run_eval(monkeypatch, grpo, [1, 0, 1, 1], "--no_baselines")
    assert sorted(os.listdir(tmp_path)) == ["grpo.json", "grpo.predictions.jsonl", "sft.json", "sft.predictions.jsonl"]
    assert json.loads(sft.read_text())["predictions"] == "sft.predictions.jsonl"
    assert exact(tmp_path / "sft.predictions.jsonl") == [0, 1, 0, 1]
    assert exact(tmp_path / "grpo.predictions.jsonl") == [1, 0, 1, 1]
    # rows 0 and 2 fixed, row 1 broken: p = 2 * (1 + 3) / 2^3 = 1
    assert evaluate.paired(str(sft), str(grpo)) == {"fixed": 2, "broken": 1, "p": 1.0}
    assert evaluate.paired(str(grpo), str(sft)) == {"fixed": 1, "broken": 2, "p": 1.0}


def test_paired_reads_folders_written_before_predictions_were_named(tmp_path):
    for name, right in (("a", [0, 0, 0, 1]), ("b", [1, 1, 1, 0])):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "metrics.json").write_text(json.dumps({"accuracy": sum(right) / 4}))  # no "predictions"
        (tmp_path / name / "predictions.jsonl").write_text(
            "".join(json.dumps({"id": f"q{i}", "exact": float(e)}) + "\n" for i, e in enumerate(right)))
    want = {"fixed": 3, "broken": 1, "p": 0.625}  # 2 * (1 + 4) / 16
    assert evaluate.paired(str(tmp_path / "a"), str(tmp_path / "b")) == want
    assert evaluate.paired(str(tmp_path / "a" / "metrics.json"), str(tmp_path / "b" / "metrics.json")) == want


# -----------------------------------------------------------------------------
# the question-only classifier


def row(question, answer, answer_type):
    return {"question": question, "answer": answer, "answer_type": answer_type}


TRAIN = [row("Is there a fracture of the left rib?", "yes", "closed"),
         row("Is there a fracture of the right rib?", "no", "closed"),
         row("Is there a fracture of the left femur?", "yes", "closed"),
         row("Is the liver enlarged?", "yes", "closed"),
         row("Is the liver normal?", "no", "closed"),
         row("Is there an effusion?", "no", "closed"),
         row("Is there an effusion on the left?", "yes", "closed"),
         row("Which organ is enlarged?", "liver", "open"),
         row("Which organ is abnormal?", "the liver", "open"),
         row("Which organ is abnormal here?", "spleen", "open"),
         row("Which side is the fracture on?", "left", "open"),
         row("Which side is the effusion on?", "right", "open"),
         row("Which side is the mass on?", "right", "open"),
         row("What imaging modality is this?", "CT", "open"),
         row("What imaging modality is used?", "MRI", "open"),
         row("What imaging modality was used here?", "ct", "open")]
TEST = [row("Is there a fracture of the right femur?", "no", "closed"),
        row("Is the spleen enlarged?", "yes", "closed"),
        row("Which organ is enlarged here?", "liver", "open"),
        row("Which side is the fracture on here?", "left", "open"),
        row("What modality is used?", "mri", "open"),
        row("Is there an effusion on the right?", "no", "closed"),
        row("Where is the mass?", "right", "other")]  # an answer type unseen in training: any answer


def dense_ridge(train, rows, lam):
    """The classifier written out directly: a dense X (grams seen twice, unit norm, then a constant), a one-hot
    Y, W = (X'X + lam I)^-1 X'Y, and each row's best answer among its answer type's. Also each row's margin."""
    norm = rewards.normalize_answer
    counts = collections.Counter(g for r in train for g in evaluate.question_grams(r["question"]))
    vocab = sorted((g for g, c in counts.items() if c >= 2), key=lambda g: (-counts[g], g))
    answers = sorted({norm(r["answer"]) for r in train})

    def features(rs):
        x = np.array([[g in evaluate.question_grams(r["question"]) for g in vocab] for r in rs], dtype=float)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1.0)
        return np.hstack([x, np.ones((len(rs), 1))])
    x, y = features(train), np.array([[norm(r["answer"]) == a for a in answers] for r in train], dtype=float)
    scores = features(rows) @ np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)
    out, margins = [], []
    for s, r in zip(scores, rows):
        seen = {norm(t["answer"]) for t in train if t["answer_type"] == r["answer_type"]}
        s = np.array([v if a in seen or not seen else -np.inf for v, a in zip(s, answers)])
        top = np.sort(s)[::-1]
        out.append(answers[int(np.argmax(s))])
        margins.append(top[0] - top[1])
    return out, margins


@pytest.mark.parametrize("lam", [0.01, 0.3, 3.0, 30.0])  # at 30 the answer types decide: unmasked, all say yes
def test_classifier_is_the_dense_closed_form_ridge(lam):
    want, margins = dense_ridge(TRAIN, TEST, lam)
    assert min(margins) > 1e-6  # no near tie: rounding cannot decide an answer here
    predict = evaluate.question_classifier(TRAIN, val_rows=TRAIN, lambdas=(lam,), chunk=3)  # 7 rows: 3 chunks
    assert predict.lam == lam and predict.many(TEST) == want
    assert [predict(r) for r in TEST] == want


def test_classifier_chooses_the_regularisation_on_val_rows():
    lambdas = (0.01, 0.1, 1.0, 10.0)
    gold = [rewards.normalize_answer(r["answer"]) for r in TEST]
    right = {lam: sum(p == g for p, g in zip(dense_ridge(TRAIN, TEST, lam)[0], gold)) for lam in lambdas}
    assert len(set(right.values())) > 1  # the choice matters
    want = max(lambdas, key=lambda lam: (right[lam], lam))  # ties: the smoother model
    assert evaluate.question_classifier(TRAIN, val_rows=TEST, lambdas=lambdas, chunk=2).lam == want


def test_classifier_memory_does_not_grow_with_the_rows():
    """Peak memory of a fit, at 500 and at 4,000 training rows with the same vocabulary (49 grams), answers and
    val rows: a dense X and one-hot Y cost 8 bytes x (50 + 6), ~450 bytes, per row (before #34: 460)."""
    findings, organs = ["fracture", "mass", "effusion", "nodule", "cyst"], ["lung", "liver", "rib", "kidney"]
    questions = [(f"is there a {f} in the {s} {o}", "closed")
                 for f in findings for s in ("left", "right") for o in organs]
    questions += [(f"which side has the {f} in the {o}", "open") for f in findings for o in organs]
    answers = {"closed": ["yes", "no"], "open": ["left", "right", "both", "neither"]}
    rows = [row(q, answers[t][i % len(answers[t])], t) for i, (q, t) in
            ((i, questions[(7 * i) % len(questions)]) for i in range(4000))]

    def peak(n):
        train = rows[:n]
        tracemalloc.start()
        evaluate.question_classifier(train, val_rows=rows[:60])  # the same val rows: scoring them costs the same
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return size
    small, large = peak(500), peak(4000)
    assert large - small < 20 * 3500, (small, large)  # under 20 bytes per added row
