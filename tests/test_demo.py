"""demo.py's paired comparison (fixed / broke / McNemar p) on hand-worked predictions."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("demo", os.path.join(ROOT, "demo.py"))
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)


def write(folder, exact):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "predictions.jsonl"), "w") as f:
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
    got = demo.paired(str(tmp_path / "a"), str(tmp_path / "b"))
    assert (got["fixed"], got["broke"]) == (fixed, broke)
    assert got["p_value"] == pytest.approx(p, abs=1e-4)
