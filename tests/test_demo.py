"""evaluate.paired: the paired comparison (fixed / broke / McNemar p) on hand-worked predictions; curves.png and
report.html from a small fake run folder."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "demo.py"))
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)


def write(folder, exact):
    """An evaluate.py folder as it writes one: metrics.json, naming its predictions file."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump({"predictions": "metrics.predictions.jsonl"}, f)
    with open(os.path.join(folder, "metrics.predictions.jsonl"), "w") as f:
        for i, e in enumerate(exact):
            f.write(json.dumps({"id": f"q{i}", "exact": float(e)}) + "\n")


@pytest.mark.parametrize("before, after, fixed, broke, p", [
    ([0, 0, 0, 1, 1], [1, 1, 1, 1, 1], 3, 0, 0.25),          # 2 * (1/2)^3
    ([0] * 6 + [1], [1] * 7, 6, 0, 0.0312),                 # 2 * (1/2)^6 = 0.03125
    ([0, 1, 0, 1], [1, 0, 1, 0], 2, 2, 1.0),                # as many fixed as broken
    ([1, 1, 0], [1, 1, 0], 0, 0, 1.0),                      # no flips at all
    ([0, 0, 0, 1], [1, 1, 1, 0], 3, 1, 0.625),              # 2 * (1 + 4) / 16
])
def test_paired_counts_flips_and_sign_test(tmp_path, before, after, fixed, broke, p):
    write(tmp_path / "a", before)
    write(tmp_path / "b", after)
    got = evaluate.paired(str(tmp_path / "a"), str(tmp_path / "b"))
    assert (got["fixed"], got["broken"]) == (fixed, broke)
    assert got["p"] == pytest.approx(p, abs=1e-4)


# -----------------------------------------------------------------------------
# curves.png and report.html from a small fake run folder

def fake_run(folder):
    """A finished demo folder in miniature: metrics, two models' predictions on 4 questions, report.json."""
    def dump(path, records):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    dump(os.path.join(folder, "sft", "metrics.jsonl"),
         [{"step": s, "loss": 5.0 / s, **({"val_loss": 4.0 / s} if s % 2 == 0 else {})} for s in range(1, 7)])
    dump(os.path.join(folder, "grpo", "metrics.jsonl"),
         [{"step": s, "kl": 0.01 * s, "reward_accuracy": 0.5 + 0.1 * s, "reward_format": 1.0, "reward_fact": 0.9,
           "reward_consistency": 1.0, **({"val_accuracy": 0.8 + 0.05 * s} if s % 2 == 0 else {})} for s in range(1, 5)])
    ids = [f"demo-test-000{i}-0" for i in range(4)]
    sft_exact, grpo_exact = [0, 1, 0, 1], [1, 0, 1, 1]  # q0, q2 fixed; q1 broken; q3 unchanged

    def preds(exact, who):
        return [{"id": i, "question": f"Question {n}?", "gold": "yes", "exact": float(e), "pred": "yes" if e else "no",
                 "format": 1.0, "fact": 0.5, "consistency": 1.0,
                 "completion": f"<think>{who} reasons {n}.</think><answer>{'yes' if e else 'no'}</answer>"}
                for n, (i, e) in enumerate(zip(ids, exact))]
    grpo = preds(grpo_exact, "GRPO")
    grpo[1]["completion"] = "<img src=x onerror=alert(1)>"  # the model's text is text, never markup
    for stage, records in (("eval_sft", preds(sft_exact, "SFT")), ("eval_grpo", grpo)):  # as evaluate.py names them
        dump(os.path.join(folder, stage, "metrics.predictions.jsonl"), records)
        with open(os.path.join(folder, stage, "metrics.json"), "w") as f:
            json.dump({"predictions": "metrics.predictions.jsonl"}, f)
    res = lambda acc: {"dataset": "demo", "split": "test", "n": 4, **{k: acc for k in demo.KEYS},  # noqa: E731
                       "baselines": {"majority": 0.25, "question_only": 0.5}}
    with open(os.path.join(folder, "report.json"), "w") as f:
        json.dump({"base": res(0.0), "sft": res(0.5), "grpo": res(0.75),
                   "grpo_vs_sft": evaluate.paired(os.path.join(folder, "eval_sft", "metrics.json"),
                                                  os.path.join(folder, "eval_grpo", "metrics.json")),
                   "seconds": {"sft": 1.0}, "total_seconds": 1.0}, f)


def inline_srcs(page):
    """Every src= of every tag (the model's escaped text holds no "<", so never counts)."""
    return re.findall(r"<[^>]*\bsrc=['\"]?([^'\" >]*)", page)


def test_report_is_one_self_contained_page_with_table_and_rollouts(tmp_path):
    folder = str(tmp_path / "run")
    fake_run(folder)
    page = open(demo.write_report(folder), encoding="utf-8").read()
    # self-contained: no link or file reference; every src= is inline data
    assert "http://" not in page and "https://" not in page
    srcs = inline_srcs(page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    # the results table: one row per model, the baselines, the paired comparison
    for text in ("<table>", "after SFT + GRPO", "<td>0.750</td>", "<td>0.500</td>", "question-only baseline",
                 "fixed 2, broke 1 (McNemar p = 1.000): no more than chance"):
        assert text in page, text
    # rollouts before and after GRPO, with their rewards; the model's text escaped, never markup
    assert page.count("fixed by GRPO") == 2 and page.count("broken by GRPO") == 1 and page.count("unchanged") == 1
    assert "SFT reasons 0.&lt;/think&gt;&lt;answer&gt;no" in page and "GRPO reasons 0." in page
    assert "&lt;img src=x onerror" in page and "<img src=x" not in page
    assert page.count("fact 0.50") == 8  # 4 questions x 2 models
    assert len(srcs) == 4  # each question's image (demo ids: drawn from the demo); no curves.png yet


def test_curves_and_plot_command(tmp_path):
    pytest.importorskip("matplotlib")
    folder = str(tmp_path / "run")
    fake_run(folder)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--plot", folder], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    with open(os.path.join(folder, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    page = open(os.path.join(folder, "report.html"), encoding="utf-8").read()
    srcs = inline_srcs(page)
    assert "Training curves" in page and len(srcs) == 5 and all(s.startswith("data:image/png;base64,") for s in srcs)


def test_plot_without_metrics_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--plot", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0 and "no sft/metrics.jsonl or grpo/metrics.jsonl" in run.stderr


@pytest.mark.parametrize("fixed, broken, p, says", [
    (33, 9, 0.0002, "it fixed more answers than it broke, more often than chance would (p < 0.05)"),
    (9, 33, 0.0002, "it broke more answers than it fixed, more often than chance would (p < 0.05)"),
    (19, 9, 0.087, "no more than chance would give (p >= 0.05); this run shows no change either way"),
    (9, 19, 0.087, "no more than chance would give (p >= 0.05)")])
def test_the_verdict_says_what_the_p_value_means_in_both_directions(fixed, broken, p, says):
    text = demo.verdict({"fixed": fixed, "broken": broken, "p": p})
    assert says in text and f"fixed {fixed}, broke {broken}" in text
    assert ("more often than chance" in text) == (p < 0.05)  # p 0.087 never reads as a significant gain

