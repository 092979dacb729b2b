"""bench/real_table.py: the README's real-benchmark table is read from the results files, hand-worked; the commands
the results record (benchmarks.sh, demo_seeds.py) and the table shows are relative to the repo root."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import real_table  # noqa: E402


def metrics(acc, closed, open_, recall):
    return {"n": 10, "accuracy": acc, "closed_accuracy": closed, "open_accuracy": open_, "open_recall": recall,
            "baselines": {"majority": 0.2, "closed_majority": 0.5, "question_only": 0.3, "question_trained": 0.35}}


def results(tmp_path):
    res = {"command": "bash bench/benchmarks.sh --data X --name toy", "seconds": 100, "retrieve_seconds": 60,
           "seeds": [{"seed": 0, "seconds": 600, "sft": metrics(0.5, 0.6, 0.4, 0.45),
                      "grpo": metrics(0.7, 0.8, 0.6, 0.65), "paired": {"fixed": 3, "broken": 1, "p": 0.625}},
                     {"seed": 1, "seconds": 1200, "sft_reused": True, "sft": metrics(0.6, 0.7, 0.5, 0.55),
                      "grpo": metrics(0.6, 0.7, 0.5, 0.55), "paired": {"fixed": 0, "broken": 0, "p": 1.0}}]}
    (tmp_path / "real_toy.json").write_text(json.dumps(res))
    return tmp_path


def test_rows_per_seed_and_the_mean(tmp_path):
    text, commands = real_table.table([str(results(tmp_path) / "real_toy.json")])
    lines = text.splitlines()
    assert commands == ["bash bench/benchmarks.sh --data X --name toy"] and len(lines) == 2 + 2 + 1
    seed0 = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert seed0[:5] == ["toy", "0", "10", "0.500", "**0.700**"]
    assert seed0[5:] == ["0.600 / 0.800", "0.400 / 0.600", "0.450 / 0.650", "3 / 1 (0.625)", "0.200 (0.500)",
                         "0.300 / 0.350", "11"]  # (600 + 60) s = 11 minutes; lookup / trained question-only
    seed1 = [c.strip() for c in lines[3].split("|")[1:-1]]
    assert seed1[-1] == "20 (GRPO only)"  # --reuse_sft: the seed ran GRPO only, without the retrieval
    mean = [c.strip() for c in lines[4].split("|")[1:-1]]
    assert mean[1:5] == ["mean", "", "0.550", "**0.650**"]
    assert mean[8] == "3 / 1 (pooled, 0.625)"  # 2 x (C(4,0) + C(4,1)) / 2^4 = 10 / 16


def test_each_seed_lists_the_command_that_ran_it(tmp_path):
    res = json.load(open(results(tmp_path) / "real_toy.json"))
    res["seeds"][1]["command"] = "bash bench/benchmarks.sh --data X --name toy --seeds 1"
    (tmp_path / "real_toy.json").write_text(json.dumps(res))
    _, commands = real_table.table([str(tmp_path / "real_toy.json")])
    assert commands == ["bash bench/benchmarks.sh --data X --name toy", "bash bench/benchmarks.sh --data X --name toy --seeds 1"]


def test_ablation_rows_against_sft(tmp_path):
    folder = results(tmp_path)
    variant = lambda acc, fixed, broken, p: {"seconds": 90, "command": "bash bench/benchmarks.sh --reuse_grpo --ablation",
                                             "test": metrics(acc, acc, acc, acc), "vs_sft": {"fixed": fixed, "broken": broken, "p": p}}
    abl = {"command": "x", "seeds": {"seed0": {"no_fact": variant(0.55, 2, 2, 1.0), "no_sft": variant(0.0, 0, 5, 0.0625)}}}
    (folder / "ablation_toy.json").write_text(json.dumps(abl))
    text, commands = real_table.ablation_table([str(folder / "ablation_toy.json")])
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()[2:]]
    assert [r[2] for r in rows] == ["SFT", "SFT + GRPO (all four rewards)", "GRPO without the SFT cold start",
                                    "SFT + GRPO without the fact reward"]  # the paper's order, not the file's
    assert rows[0][3:] == ["0.500", "0.600", "0.400", "", ""] and rows[1][3] == "0.700" and rows[1][6] == "3 / 1 (0.625)"
    assert rows[2][3:] == ["0.000", "0.000", "0.000", "0 / 5 (0.062)", "2"] and rows[3][6] == "2 / 2 (1.000)"
    assert commands == ["bash bench/benchmarks.sh --reuse_grpo --ablation"]


def test_the_readme_is_rewritten_between_its_markers_only(tmp_path):
    folder = results(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{real_table.START}\nold table\n{real_table.END}\nafter\n")  # no ablation file: its markers optional
    cmd = [sys.executable, os.path.join(ROOT, "bench", "real_table.py"), "--results", str(folder), "--readme", str(readme)]
    subprocess.run(cmd, check=True, capture_output=True)
    text = readme.read_text()
    assert text.startswith(f"before\n{real_table.START}\n```\nbash bench/benchmarks.sh") and text.endswith(
        f"{real_table.END}\nafter\n") and "old table" not in text and "**0.700**" in text
    readme.write_text("no markers\n")
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode != 0 and "no table markers" in out.stderr and readme.read_text() == "no markers\n"


def test_commands_are_shown_as_a_reader_pastes_them_at_the_repo_root():
    root = "/home/me/medfact"  # what the run recorded on its machine
    command = ("bash bench/benchmarks.sh --data /home/me/shared/data/vqa_rad --name vqa_rad --out /home/me/medfact/runs/real "
               "--results=/home/me/medfact/runs/r.json --corpus /data/kg --extra_train ../shared/data/slake/Slake1.0")
    assert real_table.relative(command, root) == (
        "bash bench/benchmarks.sh --data ../shared/data/vqa_rad --name vqa_rad --out runs/real --results=runs/r.json "
        "--corpus /data/kg --extra_train ../shared/data/slake/Slake1.0")  # a path elsewhere stays as recorded


def test_benchmarks_sh_records_its_command_relative_to_the_repo_root(tmp_path):
    # given from another folder: --data relative to it, --results absolute in the repo; PY=false stops the run
    # at its first step, after it has logged the command it records
    data = os.path.relpath(os.path.join(ROOT, "tests"), tmp_path)
    cmd = ["bash", os.path.join(ROOT, "bench", "benchmarks.sh"), "--data", data, "--name", "toy", "--results",
           os.path.join(ROOT, "runs", "toy.json"), "--out", str(tmp_path / "runs"), "--corpus", "cxr-glossary"]
    out = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PY": "false"}, capture_output=True, text=True)
    assert out.returncode != 0 and "command: bash bench/benchmarks.sh --data tests --name toy --results runs/toy.json --out " \
        in out.stderr, out.stderr
    assert not os.path.exists(os.path.join(ROOT, "runs", "toy.json"))


def test_demo_seeds_records_its_command_relative_to_the_repo_root():
    import demo_seeds
    argv = ["--seeds", "0", "--out", os.path.join(ROOT, "bench", "results", "x.json"), "--runs", "runs/demo_seeds"]
    assert demo_seeds.command(argv) == "python bench/demo_seeds.py --seeds 0 --out bench/results/x.json --runs runs/demo_seeds"


def test_demo_seeds_pools_the_paired_counts_over_seeds():
    import demo_seeds
    from evaluate import mcnemar
    run = lambda seed, sft, grpo, f, b, cf, cb: {  # noqa: E731
        "seed": seed, "threads": 2, "sft": sft, "grpo": grpo, "wall_seconds": 600,
        "paired": {"fixed": f, "broken": b, "p": mcnemar(f, b)},
        "control": {"accuracy": 0.94, "vs_sft": {"fixed": 5, "broken": 5, "p": 1.0},
                    "grpo_vs_control": {"fixed": cf, "broken": cb, "p": mcnemar(cf, cb)}}}
    results = [run(0, 0.90, 0.95, 20, 4, 9, 3), run(1, 0.92, 0.96, 12, 2, 4, 4)]
    pooled = demo_seeds.pool(results)
    assert pooled["grpo_vs_sft"] == {"fixed": 32, "broken": 6, "p": round(mcnemar(32, 6), 6)}
    assert pooled["grpo_vs_control"] == {"fixed": 13, "broken": 7, "p": round(mcnemar(13, 7), 6)}
    assert pooled["control_vs_sft"] == {"fixed": 10, "broken": 10, "p": 1.0}
    assert (pooled["sft"], pooled["grpo"], pooled["control"]) == (0.91, 0.955, 0.94)
    assert mcnemar(32, 6) < 0.001  # 38 flips, 6 against: far from a coin's 19
    text = demo_seeds.table(results, pooled)
    assert "| pooled | | 0.910 | 0.955 | 0.940 | 32 / 6 (< 0.001) | 13 / 7 (0.263) | |" in text
    assert "| 0 | 2 | 0.900 | 0.950 | 0.940 | 20 / 4 (0.002) | 9 / 3 (0.146) | 10.0 |" in text
    del results[0]["control"]  # a run without the control: no pooled control row, no crash
    assert "grpo_vs_control" not in demo_seeds.pool(results) and "| - |" in demo_seeds.table(results, demo_seeds.pool(results))
