"""Reliability, end to end on CPU: exact resume after SIGKILL, 2 processes (DDP and FSDP2) equal 1,
one-line errors for bad input (or skipped with a count), the non-finite guard, atomic checkpoints,
and nothing unsafe loaded.

The 1-process reference runs happen in this process (fixtures, one torch thread, so a run is
bitwise reproducible); the runs that must be killed, and the 2-process ones, are subprocesses.
The 2-process side is this file run under torchrun (see the bottom): one process group serves
all its runs, so the imports are paid once.
"""
import copy
import io
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint
import data  # noqa: E402
import evaluate  # noqa: E402
import grpo  # noqa: E402
import model as M  # noqa: E402
import retrieve  # noqa: E402
import sft  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false"}
TIMING = ("time", "tokens_per_s", "seconds")  # and every t_* field: they differ between any two runs


def run(stage, argv):
    stage.main(stage.parser.parse_args([str(a) for a in argv]))


def sft_args(tmp, out, *extra):
    return ["--data", tmp["pseudo"], "--model", tmp["ckpt"], "--out", out, "--batch_size", 4, "--max_steps", 6,
            "--save_every", 2, "--val_frac", 0.1, "--eval_every", 3, "--warmup", 2, *extra]


def grpo_args(tmp, out, *extra):
    # upstream rewards: their substring accuracy gives a random tiny model some reward spread, so it learns
    return ["--ckpt", tmp["ckpt"], "--data", "demo", "--out", out, "--prompts_per_step", 4, "--group_size", 2,
            "--max_new_tokens", 12, "--micro_batch", 4, "--max_steps", 6, "--save_every", 2, "--eval_every", 3,
            "--val_limit", 4, "--upstream_rewards", "--keep_last", *extra]


def eval_args(ckpt, out):
    return ["--ckpt", ckpt, "--data", "demo", "--split", "test", "--limit", 10, "--max_new_tokens", 12,
            "--batch_size", 4, "--no_baselines", "--quiet", "--out", os.path.join(out, "metrics.json")]


def records(out, name="metrics.jsonl"):
    with open(os.path.join(out, name)) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("t_") and k not in TIMING}
                for line in f if line.strip()]


def weights(out):
    return load_file(os.path.join(out, "model.safetensors"))


def assert_close_records(a, b, exact):
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for x, y in zip(a, b):
        assert x.keys() == y.keys(), x["step"]
        for k in x:
            if exact or not isinstance(x[k], float):
                assert x[k] == y[k], (x["step"], k, x[k], y[k])
            else:
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (x["step"], k)


def assert_same_weights(a, b, exact):
    # 2 processes sum gradients in another order; Adam turns that float noise into weight differences
    # of ~1e-6 (SFT, lr 2e-3, 6 steps: ~1e-3 of how far the weights moved)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]) if exact else torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5), k


# -----------------------------------------------------------------------------
# fixtures: a tiny checkpoint, pseudo-labels with image files, and the 1-process reference runs


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the subprocesses: the same reductions, so runs compare bitwise
    root = tmp_path_factory.mktemp("reliability")
    vlm = M.load("tiny", texts=data.tokenizer_texts)
    checkpoint.save_checkpoint(str(root / "tiny"), vlm, {"step": 0})
    os.makedirs(root / "images")
    with open(root / "pseudo.jsonl", "w") as f:
        for i, r in enumerate(data.load("demo", "train")[:48]):
            data.load_image(r).save(root / "images" / f"{i}.png")
            row = {k: r[k] for k in ("id", "question", "answer", "answer_type", "keywords")}
            f.write(json.dumps({**row, "image": f"images/{i}.png",
                                "target": f"<think>The image shows it.</think><answer>{r['answer']}</answer>"}) + "\n")
    yield {"root": root, "ckpt": str(root / "tiny"), "pseudo": str(root / "pseudo.jsonl"), "vlm": vlm}
    torch.set_num_threads(torch_threads)


@pytest.fixture(scope="module")
def sft_ref(tmp):
    out = str(tmp["root"] / "sft_ref")
    run(sft, sft_args(tmp, out))
    return out


@pytest.fixture(scope="module")
def grpo_ref(tmp):
    out = str(tmp["root"] / "grpo_ref")
    run(grpo, grpo_args(tmp, out))
    return out


def kill_at_step(cmd, out, step, log):
    """Start cmd, SIGKILL it as soon as metrics.jsonl has a record for `step`."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    path, deadline = os.path.join(out, "metrics.jsonl"), time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        try:
            with open(path) as f:
                if any(json.loads(line)["step"] >= step for line in f if line.endswith("\n")):
                    break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, open(log).read()[-2000:]  # killed mid-run, not finished


# -----------------------------------------------------------------------------
# exact resume


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_kill_and_resume_equals_an_uninterrupted_run(stage, tmp, request):
    ref = request.getfixturevalue(f"{stage}_ref")
    module, make_args = (sft, sft_args) if stage == "sft" else (grpo, grpo_args)
    out = str(tmp["root"] / f"{stage}_killed")
    kill_at_step([sys.executable, f"{stage}.py", *map(str, make_args(tmp, out))], out, 3, out + ".log")
    assert not os.path.exists(os.path.join(out, "model.safetensors"))  # no final model yet
    assert checkpoint.latest_checkpoint(out).endswith("step_0000002") or checkpoint.latest_checkpoint(out).endswith("step_0000004")
    # and as if a later save had been killed mid-write: a half-written temporary folder
    broken = os.path.join(out, "checkpoints", "step_0000006.tmp")
    os.makedirs(broken, exist_ok=True)
    with open(os.path.join(broken, "model.safetensors"), "wb") as f:
        f.write(b"\x00" * 100)
    run(module, make_args(tmp, out, "--resume"))
    assert_close_records(records(ref), records(out), exact=True)
    if stage == "grpo":
        assert_close_records(records(ref, "rollouts.jsonl"), records(out, "rollouts.jsonl"), exact=True)
    assert_same_weights(ref, out, exact=True)
    # not vacuous: the run changed the model (a resume that restored nothing would differ)
    assert any(not torch.equal(w, weights(tmp["ckpt"])[k]) for k, w in weights(ref).items())
    grad_norms = [r["grad_norm"] for r in records(ref)]
    assert all(g > 0 for g in grad_norms) if stage == "sft" else any(g > 0 for g in grad_norms)


def test_a_checkpoint_interrupted_mid_write_is_never_used(tmp, monkeypatch):
    out = str(tmp["root"] / "interrupted")
    vlm, opt = tmp["vlm"], torch.optim.AdamW(tmp["vlm"].model.parameters())
    checkpoint.save_step_checkpoint(out, 2, vlm, {"step": 2}, opt)

    def killed_mid_write(obj, path, *a, **k):  # the optimizer file is half written, then the process dies
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_step_checkpoint(out, 4, vlm, {"step": 4}, opt)
    monkeypatch.undo()
    root = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(root)) == ["step_0000002", "step_0000004.tmp"]
    assert checkpoint.latest_checkpoint(out) == os.path.join(root, "step_0000002")
    assert checkpoint.load_state(checkpoint.latest_checkpoint(out)) == {"step": 2}
    M.load(checkpoint.latest_checkpoint(out))  # complete and loadable
    # the next save replaces the leftover; old ones beyond `keep` go
    for step in (4, 6):
        checkpoint.save_step_checkpoint(out, step, vlm, {"step": step}, opt)
    assert sorted(os.listdir(root)) == ["step_0000004", "step_0000006"]


# -----------------------------------------------------------------------------
# 2 processes (torchrun, gloo) equal 1 process with the same global batch; FSDP2 too


@pytest.mark.slow
def test_two_processes_equal_one(tmp, sft_ref, grpo_ref):
    # the random tiny model, its matrices x6: greedy completions then differ from row to row
    loud, eval_ref = str(tmp["root"] / "loud"), str(tmp["root"] / "eval_ref")
    scaled = copy.deepcopy(tmp["vlm"].model)
    with torch.no_grad():
        for p in scaled.parameters():
            p.mul_(6 if p.dim() >= 2 else 1)
    checkpoint.save_checkpoint(loud, tmp["vlm"], {"step": 0}, model=scaled)
    run(evaluate, eval_args(loud, eval_ref))
    d = {k: str(tmp["root"] / f"{k}_2p") for k in ("sft", "grpo", "eval", "sft_fsdp", "grpo_fsdp")}
    runs = [("sft", sft_args(tmp, d["sft"])), ("grpo", grpo_args(tmp, d["grpo"])),
            ("evaluate", eval_args(loud, d["eval"])),
            ("sft", sft_args(tmp, d["sft_fsdp"], "--fsdp")), ("grpo", grpo_args(tmp, d["grpo_fsdp"], "--fsdp"))]
    plan = tmp["root"] / "plan.json"
    plan.write_text(json.dumps([(s, [str(a) for a in argv]) for s, argv in runs]))
    log = tmp["root"] / "torchrun.log"
    with open(log, "w") as f:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.abspath(__file__), str(plan)]
        rc = subprocess.run(cmd, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT, timeout=480).returncode
    assert rc == 0, log.read_text()[-3000:]
    for ref, two in ((sft_ref, d["sft"]), (grpo_ref, d["grpo"]), (sft_ref, d["sft_fsdp"]), (grpo_ref, d["grpo_fsdp"])):
        assert_close_records(records(ref), records(two), exact=False)
        assert_same_weights(ref, two, exact=False)
    assert_close_records(records(grpo_ref, "rollouts.jsonl"), records(d["grpo"], "rollouts.jsonl"), exact=False)
    # FSDP checkpoints gather full weights and a name-keyed optimizer: the plan resumed the FSDP SFT
    # run from its step-4 checkpoint after it finished, and the result still equals the reference
    assert "resumed from" in log.read_text() and len(records(d["sft_fsdp"])) == 6
    one, two = (json.load(open(os.path.join(p, "metrics.json"))) for p in (eval_ref, d["eval"]))
    assert {k: v for k, v in one.items() if k not in TIMING} == {k: v for k, v in two.items() if k not in TIMING}
    predictions = records(eval_ref, "metrics.predictions.jsonl")
    assert predictions == records(d["eval"], "metrics.predictions.jsonl") and len(predictions) == 10
    assert len({p["completion"] for p in predictions}) == 10  # so rows gathered out of order would show


def test_zero_spread_groups_skip_training_without_changing_the_policy_gradient(tmp):
    # with kl_coef 0 the loss is the policy-gradient term alone, and a group whose rewards are all equal has
    # advantage 0: leaving those groups out of the training pass (the default) must give the same run as
    # training on them (--train_zero_std), sample for sample and weight for weight
    skip, full = str(tmp["root"] / "grpo_skip"), str(tmp["root"] / "grpo_full")
    flags = ["--kl_coef", 0, "--max_steps", 4, "--save_every", 0, "--eval_every", 0]
    run(grpo, grpo_args(tmp, skip, *flags))
    run(grpo, grpo_args(tmp, full, *flags, "--train_zero_std"))
    a, b = records(skip), records(full)
    assert any(0 < r["zero_std_groups"] < 1 for r in a)  # some groups skipped, some trained
    assert [r["trained"] for r in a] == [1 - r["zero_std_groups"] for r in a] and all(r["trained"] == 1 for r in b)
    keys = [k for k in a[0] if k.startswith("reward") or k in ("zero_std_groups", "adv_std", "len_mean")]
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert_same_weights(skip, full, exact=False)
    assert not all(torch.equal(w, weights(tmp["ckpt"])[k]) for k, w in weights(skip).items())  # it did train


# -----------------------------------------------------------------------------
# numerical faults: a non-finite loss skips the update, is logged, and a few in a row stop the run


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp):
    out = str(tmp["root"] / "nan")
    argv = sft_args(tmp, out, "--debug_nan_steps", 2, 4, 5, 6, "--save_every", 1, "--max_steps", 8,
                    "--max_bad_steps", 3)
    with pytest.raises(RuntimeError) as e:
        run(sft, argv)
    root = os.path.join(out, "checkpoints")
    # a flagged step saves no checkpoint (none at 2, 4, 5, 6); step 3's weights fed step 4, where the trouble
    # began: not good, set aside; the last good one is step 1's (step 2 was flagged, but the run recovered)
    last_good = os.path.join(root, "step_0000001")
    assert str(e.value) == (f"3 bad steps in a row (non-finite or spike, steps 4-6); stopping. Last good checkpoint: "
                            f"{last_good} (set aside as *.bad, the step after each flagged or its weights not "
                            f"finite: step_0000003). Lower --lr and --resume.")
    assert sorted(os.listdir(root)) == ["step_0000001", "step_0000003.bad"]
    assert checkpoint.latest_checkpoint(out) == last_good  # what --resume continues from
    recs = records(out)
    assert [(r["step"], r.get("skipped", False)) for r in recs] == [
        (1, False), (2, True), (3, False), (4, True), (5, True), (6, True)]
    assert recs[1]["loss"] is None and math.isfinite(recs[2]["loss"])  # trains on after a single skip
    # the skipped steps never reached the optimizer: one update (step 1) in the last good checkpoint
    opt = torch.load(os.path.join(last_good, "optimizer.pt"), weights_only=True)
    assert {float(s["step"]) for s in opt["state"].values()} == {1.0}
    assert all(torch.isfinite(w).all() for w in weights(last_good).values())
    assert not os.path.exists(os.path.join(out, "model.safetensors"))  # no final model from a failed run


def test_grpo_non_finite_gradient_skips_and_stops(tmp):
    out = str(tmp["root"] / "grpo_nan")
    with pytest.raises(RuntimeError, match=r"2 bad steps in a row \(non-finite or spike, steps 1-2\); stopping. "
                                           r"Last good checkpoint: None\. Lower --lr and --resume"):
        run(grpo, grpo_args(tmp, out, "--debug_nan_steps", 1, 2, "--max_bad_steps", 2, "--eval_every", 0))
    assert [(r["step"], r["skipped"]) for r in records(out)] == [(1, True), (2, True)]
    assert not os.path.exists(os.path.join(out, "model.safetensors"))


# -----------------------------------------------------------------------------
# bad input: a one-line error naming the file, the row and the problem, or skipped with a count


def write_rows(tmp, name, rows):
    path = tmp["root"] / name
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def good_row(i, **kw):
    return {"id": f"r{i}", "image": f"images/{i}.png", "question": "Is there a nodule?",
            "answer": "yes", "answer_type": "closed", "target": "<think>x</think><answer>yes</answer>", **kw}


def one_line(e, *parts):
    msg = str(e.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg
    return msg


@pytest.fixture(scope="module")
def corrupt(tmp):
    path = tmp["root"] / "images" / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return str(path)


@pytest.mark.parametrize("bad, problem", [
    (dict(image="images/nope.png"), "image file does not exist"),
    (dict(question=""), "empty question"),
    (dict(answer="  "), "empty answer"),
    (dict(answer=None), "missing field 'answer'"),
])
def test_bad_row_is_one_line_or_skipped_with_a_count(tmp, bad, problem, capsys):
    path = write_rows(tmp, "bad.jsonl", [good_row(0), good_row(1, **bad), good_row(2)])
    with pytest.raises(data.DataError) as e:
        data.load(path, "train")
    one_line(e, path, "line 2", "r1", problem)
    rows = data.load(path, "train", skip_bad_rows=True)
    assert [r["id"] for r in rows] == ["r0", "r2"]
    assert f"skipped 1 bad rows of {path}: first problem: {path}: line 2" in capsys.readouterr().err


def test_corrupt_image_and_overlong_prompt_fail_before_step_one_or_are_skipped(tmp, corrupt, capfd):
    vlm = tmp["vlm"]
    long_q = "Is there a nodule " + "in the left lung " * 600 + "?"
    path = write_rows(tmp, "bad_media.jsonl", [good_row(i) for i in range(6)] + [
        good_row(6, image=corrupt), good_row(7, question=long_q)])
    rows = data.load(path, "train")
    with pytest.raises(data.DataError) as e:
        data.check_rows(vlm, rows[:7])
    one_line(e, corrupt, "row r6", "cannot decode image")
    with pytest.raises(data.DataError) as e:
        data.check_rows(vlm, rows[:6] + rows[7:])
    msg = one_line(e, "row r7", "over the model's limit of 2048", "image tokens are never truncated")
    n = vlm.prompt_length(data.load_image(rows[7]), long_q)
    assert f"prompt is {n[0]} tokens (16 image tokens)" in msg  # the count encode() would build
    assert vlm.encode([data.load_image(rows[0])], [rows[0]["question"]])["input_ids"].size(1) == \
        vlm.prompt_length(data.load_image(rows[0]), rows[0]["question"])[0]
    # the stage itself refuses before any step is taken, and --skip_bad_rows trains on the rest
    out = str(tmp["root"] / "sft_bad")
    argv = ["--data", path, "--model", tmp["ckpt"], "--out", out, "--batch_size", 2, "--max_steps", 1,
            "--val_frac", 0, "--eval_every", 0]
    with pytest.raises(data.DataError, match="cannot decode image|over the model's limit"):
        run(sft, argv)
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))
    capfd.readouterr()
    run(sft, argv + ["--skip_bad_rows"])
    assert "skipped 2 bad rows of 8: first problem:" in capfd.readouterr().err
    assert [r["step"] for r in records(out)] == [1]


def test_file_level_bad_input(tmp):
    cases = []
    p = tmp["root"] / "latin1.jsonl"
    p.write_bytes(json.dumps(good_row(0)).encode() + b"\n" + '{"question": "caf\xe9"}'.encode("latin-1") + b"\n")
    cases.append((str(p), "line 2: not UTF-8"))
    cases.append((write_rows(tmp, "empty.jsonl", []), "empty dataset"))
    cases.append((str(tmp["root"] / "no_such_dir"), "dataset path does not exist"))
    cases.append((write_rows(tmp, "garbled.jsonl", [good_row(0), "{not json"]), "line 2: invalid JSON"))
    for path, problem in cases:
        with pytest.raises(data.DataError) as e:
            data.load(path, "train")
        one_line(e, os.path.basename(path), problem)
    # a pseudo-label row without its target: sft names the row, or skips it
    path = write_rows(tmp, "no_target.jsonl", [good_row(i) for i in range(4)] + [good_row(4, target=None)])
    argv = ["--data", path, "--model", tmp["ckpt"], "--out", str(tmp["root"] / "no_target"), "--batch_size", 2,
            "--max_steps", 1, "--val_frac", 0, "--eval_every", 0]
    with pytest.raises(data.DataError) as e:
        run(sft, argv)
    one_line(e, path, "row r4", "no 'target' field")
    run(sft, argv + ["--skip_bad_rows"])


def grpo_on(tmp, path, out, *extra):
    """A one-step grpo.py run on a rows file (upstream rewards: some reward spread from a random model)."""
    run(grpo, ["--ckpt", tmp["ckpt"], "--data", path, "--out", out, "--prompts_per_step", 4, "--group_size", 2,
               "--max_new_tokens", 8, "--max_steps", 1, "--upstream_rewards", *extra])


def test_dynamic_sampling_with_too_few_rows_is_a_one_line_error(tmp):
    # a step samples --dynamic_sampling x --prompts_per_step distinct rows; with fewer, prompts_for
    # used to divide by zero at step 1, after the models had loaded
    path = write_rows(tmp, "twelve.jsonl", [good_row(i) for i in range(12)])
    with pytest.raises(ValueError) as e:
        grpo_on(tmp, path, str(tmp["root"] / "ds_4x4"), "--eval_every", 0, "--dynamic_sampling", 4)
    one_line(e, path, "12 rows, fewer than --prompts_per_step 4 x --dynamic_sampling 4")
    out = str(tmp["root"] / "ds_3x4")
    grpo_on(tmp, path, out, "--eval_every", 0, "--dynamic_sampling", 3)  # 3 x 4 = 12: enough
    assert [r["step"] for r in records(out)] == [1]


def test_a_bad_held_out_row_is_an_error_or_skipped_never_a_missing_split(tmp, capfd):
    rows = [good_row(i, split="train") for i in range(4)] + [
        good_row(4, split="val"), good_row(5, split="val", image="images/nope.png"), good_row(6, split="val")]
    path, out = write_rows(tmp, "bad_val.jsonl", rows), str(tmp["root"] / "bad_val")
    with pytest.raises(data.DataError) as e:  # it used to read as "no held-out split", evaluation silently off
        grpo_on(tmp, path, out, "--eval_every", 1)
    one_line(e, path, "line 6", "r5", "image file does not exist")
    capfd.readouterr()
    grpo_on(tmp, path, out, "--eval_every", 1, "--skip_bad_rows")
    assert "skipped 1 bad rows" in capfd.readouterr().err
    assert records(out)[-1]["val_accuracy"] >= 0  # evaluated, on the two good held-out rows
    # a split that does not exist is not an error: the run goes on without periodic evaluation
    path, out = write_rows(tmp, "train_only.jsonl", rows[:4]), str(tmp["root"] / "train_only")
    grpo_on(tmp, path, out, "--eval_every", 1)
    assert "no held-out split for periodic eval" in capfd.readouterr().out
    assert "val_accuracy" not in records(out)[-1]


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_grad_clip_zero_trains_without_clipping(tmp, stage):
    # --grad_clip 0 means no clipping (nanoGPT's convention); it used to zero every gradient (torch's
    # clip_grad_norm_(params, 0)), which without weight decay left the model exactly where it started
    out = str(tmp["root"] / f"{stage}_no_clip")
    if stage == "sft":
        run(sft, sft_args(tmp, out, "--grad_clip", 0, "--weight_decay", 0, "--max_steps", 2, "--save_every", 0,
                          "--eval_every", 0))
    else:  # as in the zero-spread test: 4 steps at kl 0 train some groups
        run(grpo, grpo_args(tmp, out, "--grad_clip", 0, "--kl_coef", 0, "--max_steps", 4, "--save_every", 0,
                            "--eval_every", 0))
    assert any(r["grad_norm"] > 0 for r in records(out))  # the norm is still reported
    assert any(not torch.equal(w, weights(tmp["ckpt"])[k]) for k, w in weights(out).items())


def test_bad_model_folders_and_settings(tmp):
    folder = tmp["root"] / "no_weights"
    os.makedirs(folder)
    (folder / "config.json").write_text(open(os.path.join(tmp["ckpt"], "config.json")).read())
    with pytest.raises(FileNotFoundError) as e:
        M.load(str(folder))
    one_line(e, str(folder), "no *.safetensors weights")
    with pytest.raises(FileNotFoundError) as e:
        M.load(str(tmp["root"] / "missing" / "ckpt"))
    one_line(e, "missing/ckpt", "no such checkpoint folder")
    llama = tmp["root"] / "llama"
    os.makedirs(llama)
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (llama / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError) as e:
        M.load(str(llama))
    one_line(e, str(llama), "unsupported model type 'llama'", "qwen2_5_vl")
    with pytest.raises(ValueError) as e:
        run(grpo, grpo_args(tmp, str(tmp["root"] / "g1"), "--group_size", 1))
    one_line(e, "--group_size must be >= 2", "advantage")


# -----------------------------------------------------------------------------
# safety: safetensors only, weights_only=True, no remote code, keys from the environment only


class Boom:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_nothing_unsafe_is_loaded(tmp):
    marker = tmp["root"] / "pwned"
    # a folder with only pickled weights is refused; with both, the pickle is never opened
    folder = tmp["root"] / "pickled"
    os.makedirs(folder)
    (folder / "config.json").write_text(open(os.path.join(tmp["ckpt"], "config.json")).read())
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump(Boom(str(marker)), f, protocol=2)
    with pytest.raises(FileNotFoundError, match="only safetensors are loaded, never pickle"):
        M.load(str(folder))
    for name in os.listdir(tmp["ckpt"]):
        if name != "config.json":
            os.link(os.path.join(tmp["ckpt"], name), folder / name)
    M.load(str(folder))
    # optimizer state: weights_only=True refuses anything but tensors and containers
    with open(folder / "optimizer.pt", "wb") as f:
        pickle.dump(Boom(str(marker)), f, protocol=2)
    with pytest.raises(ValueError, match="optimizer.pt: cannot load it as tensors .UnpicklingError"):
        checkpoint.load_optimizer(str(folder), torch.optim.AdamW(tmp["vlm"].model.parameters()))
    # remote code: a config that asks for its own Python is refused unless --trust_remote_code
    custom = tmp["root"] / "custom"
    os.makedirs(custom)
    config = {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig"}}
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    (custom / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError):
        M.load(str(custom))
    assert not marker.exists()
    for stage in (sft, grpo, evaluate):
        args = stage.parser.parse_args([])
        assert args.trust_remote_code is False
        # API keys come from the environment (rewards.make_openai_judge), never from a flag that args.json would save
        assert not [a for a in vars(args) if any(w in a.lower() for w in ("key", "secret", "password", "api"))]
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            src = open(os.path.join(ROOT, name)).read()
            for call in src.split("torch.load(")[1:]:
                assert "weights_only=True" in call.split("\n")[0], name
            assert "trust_remote_code=True" not in src, name


# -----------------------------------------------------------------------------
# second round (issue 15): every field and image checked before step 1, what one stage writes the next
# reads, a resume that refuses or tolerates, a last good checkpoint that is good, bounded evaluation


WRONG_TYPES = [  # (field, value, what the one-line error says); each was accepted, or crashed, before
    ("split", ["train"], "split must be text"),
    ("lang", ["en"], "lang must be text"),
    ("answer", ["yes"], "answer must be text, not list"),
    ("answer", {"a": 1}, "answer must be text, not dict"),
    ("answer", True, "answer must be text, not bool"),
    ("answer", float("nan"), "answer must be text, not float"),
    ("question", 7, "question must be text, not int"),
    ("question", "Is there\ud800 a nodule?", "question is not valid Unicode"),
    ("target", 5, "target must be text, not int"),
    ("target", ["<think>"], "target must be text, not list"),
    ("keywords", "nodule", "keywords must be a list of strings"),
    ("keywords", [1, 2], "keywords must be a list of strings"),
    ("id", ["r"], "id must be text or an integer, not list"),
    ("id", 1.5, "id must be text or an integer, not float"),
    ("category", {"c": 1}, "category must be text, not dict"),
    ("report", 3, "report must be text, not int"),
    ("dataset", [1], "dataset must be text, not list"),
    ("evidence", "a passage", "evidence must be a list of passages"),
    ("evidence", [{"text": 3}], "evidence must be a list of passages"),
    ("image", 5, "image must be a path or a PIL image, not int"),
    ("image", ".", "image is not a regular file"),
]


@pytest.mark.parametrize("field, value, problem", WRONG_TYPES, ids=[f"{f}={v!r}" for f, v, _ in WRONG_TYPES])
def test_a_field_of_the_wrong_type_is_one_line_or_skipped(tmp, field, value, problem, capsys):
    path = write_rows(tmp, "wrong_type.jsonl", [good_row(0), good_row(1, **{field: value}), good_row(2)])
    with pytest.raises(data.DataError) as e:
        data.load(path, "train")
    one_line(e, path, "line 2", problem)
    capsys.readouterr()
    assert [r["id"] for r in data.load(path, "train", skip_bad_rows=True)] == ["r0", "r2"]
    assert "skipped 1 bad rows" in capsys.readouterr().err


def test_parquet_rows_are_checked_as_jsonl_rows_are(tmp, capsys):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    image = {"bytes": open(tmp["root"] / "images" / "0.png", "rb").read(), "path": None}
    base = {"image": [image] * 4, "question": ["Is there a nodule?"] * 4, "answer": ["yes"] * 4}
    path = str(tmp["root"] / "hostile.parquet")
    pq.write_table(pa.table({**base, "split": [["train"]] * 4}), path)  # a list where the split is text
    with pytest.raises(data.DataError) as e:
        data.load(path, "train")
    one_line(e, path, "row 0", "split must be text, not list")
    pq.write_table(pa.table({**base, "id": [None, "a", "a", None], "lang": ["EN", "en", None, "en"]}), path)
    assert [r["id"] for r in data.load(path, "train")] == ["hostile-train-0", "a", "a#2", "hostile-train-3"]
    (tmp["root"] / "not.parquet").write_bytes(b"PAR1 but nothing else")
    with pytest.raises(data.DataError) as e:
        data.load(str(tmp["root"] / "not.parquet"), "train")
    one_line(e, "not.parquet", "not a readable parquet file")


def test_a_bad_target_is_skipped_before_step_one_not_met_at_step_four(tmp, capfd):
    # 12 rows, batches of 4, 3 steps: every row is trained on, so a row that got through would crash the run
    path = write_rows(tmp, "number_target.jsonl", [good_row(i) for i in range(11)] + [good_row(11, target=42)])
    out = str(tmp["root"] / "number_target")
    argv = ["--data", path, "--model", tmp["ckpt"], "--out", out, "--batch_size", 4, "--max_steps", 3,
            "--val_frac", 0, "--eval_every", 0]
    with pytest.raises(data.DataError) as e:
        run(sft, argv)
    one_line(e, path, "line 12", "target must be text, not int")
    capfd.readouterr()
    run(sft, argv + ["--skip_bad_rows"])
    assert "skipped 1 bad rows" in capfd.readouterr().err
    assert [r["step"] for r in records(out)] == [1, 2, 3]


RAMP = np.tile(np.arange(256, dtype=np.uint8), (8, 1))  # (8, 256): every 8-bit value once per row


@pytest.mark.parametrize("name, image, fmt", [
    ("16-bit, full range (I;16)", Image.fromarray(RAMP.astype(np.uint16) * 257), "PNG"),
    ("12-bit in 16 bits (I;16)", Image.fromarray(RAMP.astype(np.uint16) * 16), "PNG"),
    ("32-bit integers (I)", Image.fromarray(RAMP.astype(np.int32) * 257), "TIFF"),
    ("float within 0..1 (F)", Image.fromarray(RAMP.astype(np.float32) / 255), "TIFF"),
    ("float CT units (F)", Image.fromarray(RAMP.astype(np.float32) * 8 - 1000), "TIFF"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_high_bit_depth_images_are_scaled_to_8_bits_not_clipped(tmp, name, image, fmt):
    # PIL's convert("RGB") clips a 16-bit image to white (the report: 99.6% of the pixels)
    path = str(tmp["root"] / "images" / f"deep_{image.mode.replace(';', '_')}_{RAMP.sum() % 7}.{fmt.lower()}")
    image.save(path, format=fmt)
    for source in (path, image):  # a file, and an in-memory image
        got = np.asarray(data.load_image(source)).astype(int)
        assert got.shape == (8, 256, 3) and np.abs(got - RAMP[..., None]).max() <= 1, name


def test_every_image_mode_and_shape_reaches_the_model_or_is_one_line(tmp, capsys):
    vlm, root = tmp["vlm"], tmp["root"] / "images"
    base = Image.merge("RGB", [Image.fromarray(np.tile(np.arange(0, 240, 6, dtype=np.uint8), (30, 1)))] * 3)
    images = {mode: base.convert(mode) for mode in
              ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F")}
    images["I;16"] = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    frames = [base.convert("L"), Image.new("L", base.size, 255)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:])
    images["animated GIF"] = str(root / "animated.gif")  # its first frame
    for mode, im in images.items():
        rgb = data.load_image(im)
        assert rgb.mode == "RGB" and rgb.size == base.size, mode
        assert abs(np.asarray(rgb.convert("L")).mean() - np.asarray(base.convert("L")).mean()) < 12, mode
    # shapes: the processor's resize takes each one, or check_rows refuses it in one line (aspect > 200)
    shapes = [(1, 1), (2, 300), (300, 2), (1, 200), (3, 601), (201, 1), (5600, 28), (5601, 28)]
    rows = [good_row(i, image=f"images/shape_{w}x{h}.png") for i, (w, h) in enumerate(shapes)]
    for w, h in shapes:
        Image.new("RGB", (w, h), (90, 40, 20)).save(root / f"shape_{w}x{h}.png")
    rows = data.load(write_rows(tmp, "shapes.jsonl", rows), "train")
    with pytest.raises(data.DataError) as e:
        data.check_rows(vlm, rows)
    one_line(e, "shape_3x601.png (row r4)", "the image processor refuses a 3x601 image")
    good = data.check_rows(vlm, rows, skip_bad_rows=True)
    assert [r["id"] for r in good] == ["r0", "r1", "r2", "r3", "r6"]
    assert "skipped 3 bad rows of 8" in capsys.readouterr().err
    for r in good:  # what check_rows passed, the model takes, with the prompt length it predicted
        image = data.load_image(r)
        batch = vlm.encode([image], [r["question"]])
        assert batch["input_ids"].size(1) == vlm.prompt_length(image, r["question"])[0]
        M.sample(vlm, batch, 1, 2, 0.0)


def test_retrieve_checks_every_row_and_skips_with_a_count(tmp, corrupt, capsys):
    rows = [good_row(i) for i in range(4)] + [good_row(4, answer=["yes"]), good_row(5, image=corrupt)]
    path, out = write_rows(tmp, "retrieve_bad.jsonl", rows), str(tmp["root"] / "retrieve_bad" / "p.jsonl")
    argv = ["--data", path, "--corpus", "cxr-glossary", "--out", out]
    with pytest.raises(data.DataError) as e:
        retrieve.main(retrieve.get_args(argv))
    one_line(e, path, "line 5", "answer must be text")
    assert not os.path.exists(out)
    capsys.readouterr()
    retrieve.main(retrieve.get_args(argv + ["--skip_bad_rows"]))
    err = capsys.readouterr().err
    assert "skipped 1 bad rows of" in err and "skipped 1 bad rows of 5: first problem:" in err  # the field, the image
    assert [r["id"] for r in data.load(out, "train")] == ["r0", "r1", "r2", "r3"]


def test_cli_errors_are_one_line_without_a_traceback(tmp):
    bad = write_rows(tmp, "cli_bad.jsonl", [good_row(0), good_row(1, split=["train"])])
    commands = {  # side by side: each pays its imports (sft.py's and grpo.py's are evaluate.py's)
        "retrieve, a bad row": ["retrieve.py", "--data", bad, "--corpus", "cxr-glossary",
                                "--out", str(tmp["root"] / "cli" / "p.jsonl")],
        "evaluate, no such model": ["evaluate.py", "--ckpt", str(tmp["root"] / "no" / "model"), "--out",
                                    str(tmp["root"] / "cli" / "m.json")],
    }
    procs = {k: subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, argv in commands.items()}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 1 and "Traceback" not in err and len(lines) == 1, (name, err[-2000:])


def test_one_jsonl_pair_what_retrieve_writes_the_next_stage_reads(tmp, monkeypatch, capsys):
    # a SLAKE copy addressed relative to the working folder, rows with null and repeated ids, and text
    # holding the line separators JSON allows raw in a string
    root = tmp["root"] / "slake_copy" / "Slake1.0"
    os.makedirs(root / "imgs" / "a")
    Image.new("RGB", (20, 20), (10, 80, 10)).save(root / "imgs" / "a" / "source.jpg")
    seps = "\u2028\u2029\x85"
    base = {"img_name": "a/source.jpg", "q_lang": "en", "answer_type": "CLOSED", "content_type": "Organ"}
    questions = [f"Is there{seps}a lung?", "Is this a CT?", "Is it an MRI?", "Is it a chest?"]
    (root / "train.json").write_text(json.dumps([dict(base, qid=qid, question=q, answer="Yes")
                                                 for qid, q in zip([None, None, 7, 7], questions)]))
    os.makedirs(tmp["root"] / "work")
    monkeypatch.chdir(tmp["root"] / "work")
    argv = ["--data", "../slake_copy", "--corpus", "cxr-glossary", "--out", "runs/x/p.jsonl"]
    retrieve.main(retrieve.get_args(argv))
    ids = ["slake-0", "slake-1", "slake-7", "slake-7#2"]  # made up from the row's place; made unique
    rows = data.load("runs/x/p.jsonl", "train")
    assert [r["id"] for r in rows] == ids and [r["question"] for r in rows] == questions
    assert all(data.load_image(r).size == (20, 20) for r in rows)
    retrieve.main(retrieve.get_args(argv))  # a rerun writes nothing twice and drops nothing
    assert "resuming: 4 rows already in" in capsys.readouterr().out
    assert [r["id"] for r in data.load("runs/x/p.jsonl", "train")] == ids
    run(sft, ["--data", "runs/x/p.jsonl", "--model", tmp["ckpt"], "--out", "runs/x/sft", "--batch_size", 2,
              "--max_steps", 1, "--val_frac", 0, "--eval_every", 0])
    # the reader: a byte-order mark, CRLF, blank lines and raw U+2028; the writer: one line, whatever the text
    odd = tmp["root"] / "odd.jsonl"
    lines = [json.dumps(good_row(0, question=f"Is{seps}it?"), ensure_ascii=False), "", "  ", json.dumps(good_row(1))]
    odd.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    assert [(r["id"], r["question"]) for r in data.load(str(odd), "train")] == [
        ("r0", f"Is{seps}it?"), ("r1", "Is there a nodule?")]
    text = f"a{seps}\x0b\x0c\x1c\x1d\x1e\r\nb"
    line = data.jsonl_line({"q": text})
    assert line.endswith("\n") and len(line.splitlines()) == 1 and json.loads(line)["q"] == text


def test_retrieve_stores_each_embedded_image_once_with_its_own_bytes(tmp):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    jpegs = []
    for colour in ((200, 30, 30), (30, 200, 30), (30, 30, 200)):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), colour).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    folder = tmp["root"] / "embedded"
    os.makedirs(folder / "data")
    pq.write_table(pa.table({"image": [{"bytes": jpegs[i % 3], "path": None} for i in range(12)],
                             "question": [f"Is this image {i}?" for i in range(12)], "answer": ["yes"] * 12}),
                   str(folder / "data" / "train-00000-of-00001.parquet"))
    out = str(folder / "out" / "p.jsonl")
    retrieve.main(retrieve.get_args(["--data", str(folder), "--corpus", "cxr-glossary", "--out", out]))
    stored = sorted(os.listdir(folder / "out" / "p_images"))
    assert len(stored) == 3 and all(name.endswith(".jpg") for name in stored)  # one file per distinct image
    assert sorted(open(folder / "out" / "p_images" / n, "rb").read() for n in stored) == sorted(jpegs)  # as embedded
    rows = data.load(out, "train")
    assert len(rows) == 12 and len({r["image"] for r in rows}) == 3
    assert data.load_image(rows[4]).getpixel((5, 5)) == Image.open(io.BytesIO(jpegs[1])).convert("RGB").getpixel((5, 5))


def files_of(folder):
    return {os.path.relpath(os.path.join(d, n), folder): (open(os.path.join(d, n), "rb").read(),
                                                          os.stat(os.path.join(d, n)).st_mtime_ns)
            for d, _, names in os.walk(folder) for n in names}


def test_resume_with_nothing_to_resume_refuses_and_touches_nothing(tmp, sft_ref):
    out = str(tmp["root"] / "finished")  # a finished run that saved no step checkpoints (--save_every 0)
    shutil.copytree(sft_ref, out)
    shutil.rmtree(os.path.join(out, "checkpoints"))
    before = files_of(out)
    for stage, argv in ((sft, sft_args(tmp, out, "--resume")), (grpo, grpo_args(tmp, out, "--resume"))):
        with pytest.raises(ValueError) as e:
            run(stage, argv)
        one_line(e, out, "nothing to resume")
        assert files_of(out) == before
    with pytest.raises(ValueError) as e:  # nor in a folder that does not exist
        run(sft, sft_args(tmp, str(tmp["root"] / "never_ran"), "--resume"))
    one_line(e, "nothing to resume")
    assert not os.path.exists(tmp["root"] / "never_ran")


def test_resume_from_a_damaged_checkpoint_is_one_line(tmp, sft_ref):
    # written by hand, not by a save (which renames a whole folder): a torn optimizer.pt, a broken state.json
    out = str(tmp["root"] / "damaged")
    shutil.copytree(sft_ref, out)
    newest = checkpoint.latest_checkpoint(out)
    with open(os.path.join(newest, "optimizer.pt"), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError) as e:
        run(sft, sft_args(tmp, out, "--resume"))
    one_line(e, "optimizer.pt: cannot load it as tensors", "delete that checkpoint")
    shutil.copy(os.path.join(checkpoint.latest_checkpoint(sft_ref), "optimizer.pt"), newest)
    with open(os.path.join(newest, "state.json"), "w") as f:
        f.write('{"step": 4, "ar')
    with pytest.raises(ValueError) as e:
        run(sft, sft_args(tmp, out, "--resume"))
    one_line(e, "state.json: cannot read")


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_resume_tolerates_a_torn_last_line(tmp, stage, request):
    ref = request.getfixturevalue(f"{stage}_ref")
    module, make_args = (sft, sft_args) if stage == "sft" else (grpo, grpo_args)
    out = str(tmp["root"] / f"{stage}_torn")
    shutil.copytree(ref, out)  # finished, with checkpoints of steps 2 and 4: a rerun from step 4 ...
    logs = ["metrics.jsonl"] + (["rollouts.jsonl"] if stage == "grpo" else [])
    for name in logs:  # ... after a crash or a full disk tore the last line, inside a UTF-8 character
        with open(os.path.join(out, name), "ab") as f:
            f.write(b'{"step": 5, "question": "caf\xc3')
    run(module, make_args(tmp, out, "--resume"))
    for name in logs:
        assert_close_records(records(ref, name), records(out, name), exact=True)
    assert_same_weights(ref, out, exact=True)


def test_a_final_save_killed_midway_never_leaves_a_mix(tmp, monkeypatch):
    # the final save goes into --out, which holds the run's logs; a kill at any file operation must leave
    # the old model, the new one, or a folder load() refuses in one line: never one run's config, another's
    # weights or tokenizer
    old, new = tmp["vlm"], M.load("tiny", texts=["an entirely different corpus of words"] * 50)
    assert len(old.tokenizer) != len(new.tokenizer)
    out, outcomes = str(tmp["root"] / "final_kill"), []
    real = {"replace": os.replace, "remove": os.remove}
    for kill_at in range(100):
        for d in (out, out + ".tmp"):
            shutil.rmtree(d, ignore_errors=True)
        checkpoint.save_checkpoint(out, old, {"step": 1})
        open(os.path.join(out, "metrics.jsonl"), "w").close()
        left = [kill_at]

        def dies(name):
            def op(*a, **k):
                if left[0] == 0:
                    raise KeyboardInterrupt
                left[0] -= 1
                return real[name](*a, **k)
            return op
        monkeypatch.setattr(os, "replace", dies("replace"))
        monkeypatch.setattr(os, "remove", dies("remove"))
        try:
            checkpoint.save_checkpoint(out, new, {"step": 2})
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.undo()
        try:
            got = M.load(out)
        except ValueError as e:
            assert "\n" not in str(e)
            outcomes.append("refused")
        else:
            which = [name for name, vlm in (("old", old), ("new", new)) if len(vlm.tokenizer) == len(got.tokenizer)]
            assert which, "a tokenizer of neither run"
            ref = (old if which == ["old"] else new).model.state_dict()
            assert all(torch.equal(v, ref[k]) for k, v in got.model.state_dict().items()), (kill_at, which)
            outcomes.append(which[0])
        if finished:
            break
    assert finished and outcomes[0] == "old" and outcomes[-1] == "new" and "refused" in outcomes


def test_step_guard_ignores_ratios_near_zero():
    # a memorising SFT (VQA-RAD at two threads): losses near 2e-4, then 0.004 (20 x the median) with a
    # gradient norm of 0.3 (30 x): no blow-up, under the floors (0.1 nats a token, a gradient norm of 1)
    guard = checkpoint.StepGuard(max_bad=3)
    for step in range(1, 7):
        assert guard.check(step, loss=2e-4, grad_norm=0.01) is None
    assert guard.check(7, loss=0.004, grad_norm=0.3) is None and guard.clean
    assert guard.check(8, loss=0.09, grad_norm=0.99) is None  # both just under their floors
    assert guard.check(9, loss=0.11, grad_norm=0.01) == "spike"  # over the loss floor and 10 x its median
    assert guard.check(10, loss=2e-4, grad_norm=1.5) == "spike"  # over the gradient floor and 10 x its median


def test_step_guard_flags_spikes_and_names_a_checkpoint_from_before_the_trouble(tmp):
    guard = checkpoint.StepGuard(max_bad=2)
    for step, g in enumerate([1.0, 1.2, 0.8, 1.1, 0.9, 1.0], 1):
        assert guard.check(step, loss=2.0, grad_norm=g) is None
    assert guard.check(7, loss=2.0, grad_norm=50.0) == "spike"  # over 10 x the median
    assert not guard.clean
    assert guard.check(8, loss=2.1, grad_norm=1.0) is None and guard.clean  # one spike: the run goes on
    resumed = checkpoint.StepGuard(max_bad=2, state=json.loads(json.dumps(guard.state())))  # as state.json holds it
    assert resumed.check(9, loss=40.0, grad_norm=1.0) == guard.check(9, loss=40.0, grad_norm=1.0) == "spike"
    assert guard.check(10, loss=float("nan"), grad_norm=1.0) == "non-finite"
    out = str(tmp["root"] / "guard")
    for step, scale in ((5, 1.0), (7, float("inf")), (8, 1.0)):  # step 8's weights fed the spike at step 9
        folder = os.path.join(out, "checkpoints", f"step_{step:07d}")
        os.makedirs(folder)
        save_file({"w": torch.ones(3) * scale}, os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "state.json"), "w") as f:
            json.dump({"step": step}, f)
    with pytest.raises(RuntimeError) as e:
        guard.stop(out)
    assert "steps 9-10" in str(e.value) and f"Last good checkpoint: {out}/checkpoints/step_0000005 " in str(e.value)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [
        "step_0000005", "step_0000007.bad", "step_0000008.bad"]
    assert checkpoint.latest_checkpoint(out).endswith("step_0000005")


def test_an_exploding_update_stops_naming_a_checkpoint_that_is_good(tmp):
    # three good steps, then a learning rate that blows the weights up to ~1e30 (finite) in one update:
    # the checkpoint saved right after it looked fine, until the next step's loss was not finite
    out = str(tmp["root"] / "explode")
    argv = ["--data", tmp["pseudo"], "--model", tmp["ckpt"], "--out", out, "--batch_size", 4, "--val_frac", 0,
            "--eval_every", 0, "--warmup", 1, "--save_every", 1]
    run(sft, argv + ["--max_steps", 3])
    with pytest.raises(RuntimeError) as e:
        run(sft, argv + ["--max_steps", 8, "--resume", "--lr", 1e30])
    good = checkpoint.latest_checkpoint(out)
    assert f"Last good checkpoint: {good}" in str(e.value) and good.endswith("step_0000002")
    assert max(w.abs().max().item() for w in weights(good).values()) < 100
    assert os.path.exists(os.path.join(out, "checkpoints", "step_0000003.bad"))  # the ~1e30 one, set aside
    run(sft, argv + ["--max_steps", 8, "--resume"])  # the README's advice: lower --lr and --resume
    assert [r["step"] for r in records(out)] == list(range(1, 9)) and not any(r.get("skipped") for r in records(out))
    assert all(torch.isfinite(w).all() and w.abs().max() < 100 for w in weights(out).values())


def test_weights_come_from_safetensors_only_also_through_an_index(tmp):
    folder = tmp["root"] / "index_to_pickle"
    os.makedirs(folder)
    for name in os.listdir(tmp["ckpt"]):
        if name != "model.safetensors":
            shutil.copy(os.path.join(tmp["ckpt"], name), folder / name)
    state = weights(tmp["ckpt"])
    torch.save(state, folder / "pytorch_model.bin")  # a plain state dict: weights_only=True would load it
    for target in ("pytorch_model.bin", "../tiny/model.safetensors"):
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: target for k in state}}))
        with pytest.raises(ValueError) as e:
            M.load(str(folder))
        one_line(e, "model.safetensors.index.json", target, "only safetensors")


def test_evaluate_checks_out_first_and_decodes_batch_by_batch(tmp, monkeypatch):
    events = []
    monkeypatch.setattr(M, "generate", lambda vlm, images, questions, *a, **k:
                        events.append(("generate", len(images))) or ["<answer>yes</answer>"] * len(questions))
    for bad in (str(tmp["root"]), os.path.join(tmp["pseudo"], "metrics.json")):  # a folder; under a file
        with pytest.raises(ValueError) as e:
            run(evaluate, ["--ckpt", tmp["ckpt"], "--data", "demo", "--limit", 4, "--no_baselines", "--quiet",
                           "--out", bad])
        one_line(e, bad)
        assert events == []  # refused before any answer was generated
    import images  # where ImageCache decodes
    load_image = images.load_image
    monkeypatch.setattr(images, "load_image", lambda r: events.append("decode") or load_image(r))
    rows = data.load("demo", "test", limit=10)
    evaluate.evaluate(tmp["vlm"], rows, batch_size=4, progress=False)
    # each batch's images are decoded when its turn comes (an image already seen, once): memory does not
    # grow with the split
    expected, seen = [], set()
    for start in range(0, len(rows), 4):
        batch = rows[start:start + 4]
        new = {data.image_key(r["image"]) for r in batch} - seen
        seen |= new
        expected += ["decode"] * len(new) + [("generate", len(batch))]
    assert events == expected and "decode" in expected[expected.index(("generate", 4)):]  # not all up front


def test_bad_model_folders_and_outs_are_one_line(tmp):
    def folder(name, **files):
        path = tmp["root"] / name
        os.makedirs(path)
        for f in os.listdir(tmp["ckpt"]):
            shutil.copy(os.path.join(tmp["ckpt"], f), path / f)
        for f, content in files.items():
            (path / f.replace("_", ".", 1) if f.startswith("model_") else path / f).write_bytes(content)
        return str(path)
    cases = [folder("zero_weights", model_safetensors=b""), folder("garbage_config", **{"config.json": b"{nope"}),
             folder("list_config", **{"config.json": b"[1, 2]"}), folder("torn_weights", model_safetensors=open(
                 os.path.join(tmp["ckpt"], "model.safetensors"), "rb").read()[:5000]), tmp["pseudo"]]
    for path in cases:
        with pytest.raises(ValueError) as e:
            M.load(path)
        one_line(e, path)
    for out in (tmp["pseudo"], os.path.join(tmp["pseudo"], "sub")):  # a file; under a file
        with pytest.raises(ValueError) as e:
            run(sft, sft_args(tmp, out))
        one_line(e, out)


# -----------------------------------------------------------------------------
# the 2-process side: torchrun --nproc_per_node=2 tests/test_reliability.py PLAN.json

if __name__ == "__main__":
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    dist.destroy_process_group = lambda *a, **k: None  # each stage ends with it; here they share one group
    stages = {"sft": sft, "grpo": grpo, "evaluate": evaluate}
    for name, argv in json.load(open(sys.argv[1])):
        run(stages[name], argv)
        dist.barrier()
        if "--fsdp" in argv and name == "sft":  # resume the finished run from its newest (step 4) checkpoint
            run(sft, argv + ["--resume"])
            dist.barrier()
