"""Reliability, end to end on CPU: exact resume after SIGKILL, 2 processes (DDP and FSDP2) equal 1,
one-line errors for bad input (or skipped with a count), the non-finite guard, atomic checkpoints,
and nothing unsafe loaded.

The 1-process reference runs happen in this process (fixtures, one torch thread, so a run is
bitwise reproducible); the runs that must be killed, and the 2-process ones, are subprocesses.
The 2-process side is this file run under torchrun (see the bottom): one process group serves
all its runs, so the imports are paid once.
"""
import copy
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import evaluate  # noqa: E402
import grpo  # noqa: E402
import model as M  # noqa: E402
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
    vlm = M.load("tiny")
    M.save_checkpoint(str(root / "tiny"), vlm, {"step": 0})
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
    assert M.latest_checkpoint(out).endswith("step_0000002") or M.latest_checkpoint(out).endswith("step_0000004")
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
    M.save_step_checkpoint(out, 2, vlm, {"step": 2}, opt)

    def killed_mid_write(obj, path, *a, **k):  # the optimizer file is half written, then the process dies
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        M.save_step_checkpoint(out, 4, vlm, {"step": 4}, opt)
    monkeypatch.undo()
    root = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(root)) == ["step_0000002", "step_0000004.tmp"]
    assert M.latest_checkpoint(out) == os.path.join(root, "step_0000002")
    assert M.load_state(M.latest_checkpoint(out)) == {"step": 2}
    M.load(M.latest_checkpoint(out))  # complete and loadable
    # the next save replaces the leftover; old ones beyond `keep` go
    for step in (4, 6):
        M.save_step_checkpoint(out, step, vlm, {"step": step}, opt)
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
    M.save_checkpoint(loud, tmp["vlm"], {"step": 0}, model=scaled)
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
    predictions = records(eval_ref, "predictions.jsonl")
    assert predictions == records(d["eval"], "predictions.jsonl") and len(predictions) == 10
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
    last_good = os.path.join(out, "checkpoints", "step_0000003")
    assert str(e.value) == f"3 non-finite steps in a row at step 6; stopping. Last good checkpoint: {last_good}"
    recs = records(out)
    assert [(r["step"], r.get("skipped", False)) for r in recs] == [
        (1, False), (2, True), (3, False), (4, True), (5, True), (6, True)]
    assert recs[1]["loss"] is None and math.isfinite(recs[2]["loss"])  # trains on after a single skip
    # the skipped step never reached the optimizer: two updates (steps 1 and 3) in the last good checkpoint
    opt = torch.load(os.path.join(last_good, "optimizer.pt"), weights_only=True)
    assert {float(s["step"]) for s in opt["state"].values()} == {2.0}
    assert all(torch.isfinite(w).all() for w in weights(last_good).values())
    assert not os.path.exists(os.path.join(out, "model.safetensors"))  # no final model from a failed run


def test_grpo_non_finite_gradient_skips_and_stops(tmp):
    out = str(tmp["root"] / "grpo_nan")
    with pytest.raises(RuntimeError, match="2 non-finite steps in a row; stopping. Last good checkpoint: None"):
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
    with pytest.raises(pickle.UnpicklingError):
        M.load_optimizer(str(folder), torch.optim.AdamW(tmp["vlm"].model.parameters()))
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
