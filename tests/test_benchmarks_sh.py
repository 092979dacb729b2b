"""bench/benchmarks.sh end to end on a toy folder (steps cut by SFT_STEPS / GRPO_STEPS): the results file's
layout, --extra_train (another folder's training split joins the pseudo-labels both stages train on), and
--reuse_sft, which reruns GRPO only on an SFT model made with exactly the script's settings, and
--reuse_grpo with --ablation VARIANT ..., which shares the ablation out between processes."""

import json
import os
import subprocess
import sys

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_folder(path, sizes=(("train", 96), ("val", 6), ("test", 6)), demo_split=None):
    """<split>.jsonl rows with image paths: 96 training questions (one GRPO step's prompts), 6 val, 6 test.
    The rows come from the demo's split of the same name, or all from `demo_split`; ids start with the folder's name."""
    os.makedirs(path / "images")
    for split, n in sizes:
        rows = list(data.load("demo", demo_split or split, limit=n))  # a list, to edit
        for r in rows:
            r["id"], r["split"] = f"{path.name}-{r['id']}", split
            r["image"].save(path / "images" / f"{r['id']}.png")
            r["image"] = f"images/{r['id']}.png"
        data.write_jsonl(str(path / f"{split}.jsonl"), rows)


def bench(tmp_path, *extra):
    env = {**os.environ, "PY": sys.executable, "SFT_STEPS": "2", "GRPO_STEPS": "1", "OMP_NUM_THREADS": "1"}
    cmd = ["bash", os.path.join(ROOT, "bench", "benchmarks.sh"), "--data", str(tmp_path / "toy"), "--name", "toy",
           "--seeds", "0", "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "real_toy.json"),
           "--corpus", "cxr-glossary", "--model", "tiny", *extra]  # tiny: no weights package needed
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)


def test_results_file_extra_train_and_reuse_sft(tmp_path):
    toy_folder(tmp_path / "toy")
    toy_folder(tmp_path / "extra", sizes=(("train", 20),), demo_split="val")  # a folder with a training split only
    extra = ("--extra_train", str(tmp_path / "extra"))
    out = bench(tmp_path, *extra)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.load(open(tmp_path / "real_toy.json"))
    run = res["seeds"][0]
    assert res["command"].startswith("bash bench/benchmarks.sh --data") and run["seed"] == 0 and "sft_reused" not in run
    assert run["sft"]["n"] == run["grpo"]["n"] == 6 and run["sft"]["split"] == "test"
    assert set(run["paired"]) >= {"fixed", "broken", "p"} and run["grpo_selected"]["step"] in (0, 1)
    assert set(run["grpo_selected"]) == {"step", "val_accuracy", "val_open_accuracy", "val_open_recall"}
    seed = tmp_path / "runs" / "toy" / "seed0"
    sft_weights = (seed / "sft" / "model.safetensors").read_bytes()
    train = [r["id"] for _, r, _ in data.read_jsonl(str(tmp_path / "runs" / "toy" / "train.jsonl"))]
    assert len(train) == 116 and train[0].startswith("toy-") and train[-1].startswith("extra-")  # toy's 96, then 20
    for stage in ("sft", "grpo"):
        assert json.load(open(seed / stage / "args.json"))["data"].endswith("toy/train.jsonl")

    out = bench(tmp_path, *extra, "--reuse_sft")  # GRPO again, on the same SFT model and its evaluation
    assert out.returncode == 0, out.stderr[-2000:]
    again = json.load(open(tmp_path / "real_toy.json"))["seeds"][0]
    assert again["sft_reused"] is True and again["sft"] == run["sft"] and "sft reused" in out.stderr
    assert (seed / "sft" / "model.safetensors").read_bytes() == sft_weights
    drop = lambda m: {k: v for k, v in m.items() if k != "seconds"}
    assert drop(again["grpo"]) == drop(run["grpo"])  # the same seeds: the same GRPO run

    out = bench(tmp_path, "--reuse_sft")  # without --extra_train: other training data
    assert out.returncode != 0 and "other settings (data)" in out.stderr
    args = json.load(open(seed / "sft" / "args.json"))
    json.dump({**args, "lr": 1.0}, open(seed / "sft" / "args.json", "w"))  # an SFT model made otherwise
    out = bench(tmp_path, *extra, "--reuse_sft")
    assert out.returncode != 0 and "other settings (lr)" in out.stderr
    assert (seed / "sft" / "model.safetensors").read_bytes() == sft_weights


def test_ablation_runs_each_variant_against_sft(tmp_path):
    toy_folder(tmp_path / "toy")
    assert bench(tmp_path, "--ablation", "no_kl").returncode == 2  # not a variant: refused before anything runs
    out = bench(tmp_path, "--ablation", "no_sft", "no_accuracy")  # SFT + GRPO, then two of the variants
    assert out.returncode == 0, out.stderr[-2000:]
    abl = json.load(open(tmp_path / "ablation_toy.json"))["seeds"]["seed0"]
    assert sorted(abl) == ["no_accuracy", "no_sft"]
    seed = tmp_path / "runs" / "toy" / "seed0"
    main_weights = (seed / "grpo" / "model.safetensors").read_bytes()
    first = json.load(open(tmp_path / "real_toy.json"))["seeds"][0]

    # the other three from another process: --reuse_grpo keeps SFT, GRPO and their evaluations
    out = bench(tmp_path, "--reuse_grpo", "--ablation", "no_format", "no_fact", "no_consistency")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "grpo reused" in out.stderr and (seed / "grpo" / "model.safetensors").read_bytes() == main_weights
    res = json.load(open(tmp_path / "ablation_toy.json"))
    abl = res["seeds"]["seed0"]
    assert sorted(abl) == ["no_accuracy", "no_consistency", "no_fact", "no_format", "no_sft"]
    assert "--ablation no_sft no_accuracy" in abl["no_sft"]["command"] and "--reuse_grpo" in abl["no_fact"]["command"]
    again = json.load(open(tmp_path / "real_toy.json"))["seeds"][0]
    assert again == first and "--reuse_grpo" not in again["command"]  # the seed as its own run wrote it
    for variant, r in abl.items():
        args = json.load(open(seed / "ablation" / variant / "grpo" / "args.json"))
        # one change against the main GRPO run: the start, or one reward's weight
        main = json.load(open(seed / "grpo" / "args.json"))
        changed = sorted(k for k in args if args[k] != main[k] and k not in ("out",))
        assert changed == (["ckpt"] if variant == "no_sft" else [f"w_{variant[3:]}"]), (variant, changed)
        assert args["ckpt"] == ("tiny" if variant == "no_sft" else main["ckpt"])
        assert r["test"]["n"] == 6 and set(r["vs_sft"]) >= {"fixed", "broken", "p"}

    args = json.load(open(seed / "grpo" / "args.json"))
    json.dump({**args, "kl_coef": 0.5}, open(seed / "grpo" / "args.json", "w"))  # a GRPO run made otherwise
    out = bench(tmp_path, "--reuse_grpo")
    assert out.returncode != 0 and "--reuse_grpo" in out.stderr and "other settings (kl_coef)" in out.stderr
