"""--report_to (tracker.py): each tracker holds exactly the numbers metrics.jsonl holds, read back through the
tracker's own reader, and a table of the completions rollouts.jsonl holds; a resumed run continues the same
run; a missing package is one line before step 1; --report_to none changes nothing. Offline, on CPU."""
import argparse
import glob
import json
import os
import shutil
import struct
import sys
import time

import pytest

import data
import grpo
import sft
import tracker
from common import SetupError


def run(stage, argv):
    stage.main(stage.parser.parse_args([str(a) for a in argv]))


def grpo_args(out, *extra):  # tests/test_training.py's demo run, with held-out accuracy at step 3 and a checkpoint
    return ["--ckpt", "tiny", "--data", "demo", "--out", out, "--prompts_per_step", 4, "--group_size", 2,
            "--max_new_tokens", 12, "--micro_batch", 4, "--max_steps", 3, "--eval_every", 3, "--upstream_rewards",
            "--val_data", "demo", "--val_limit", 4, "--save_every", 2, *extra]


def lines(path):
    return [json.loads(line) for line in open(path)]


def numbers(records):
    """{(name, step): value}: what a tracker must hold, from metrics.jsonl (booleans as 0/1, None left out)."""
    return {(k, r["step"]): float(v) for r in records for k, v in r.items()
            if k != "step" and isinstance(v, (int, float))}


def tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(folder, size_guidance={"scalars": 0, "tensors": 0})  # 0: keep every event
    acc.Reload()
    got = [((tag, e.step), e.value) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]
    texts = {tag.split("/")[0]: [(t.step, t.tensor_proto.string_val[0].decode()) for t in acc.Tensors(tag)]
             for tag in acc.Tags()["tensors"]}
    assert len(dict(got)) == len(got), "a step logged twice"
    return dict(got), texts


def assert_same_numbers(got, records):
    want = numbers(records)
    assert set(got) == set(want)
    for key, v in want.items():  # TensorBoard keeps float32
        assert got[key] == pytest.approx(v, rel=1e-6, abs=1e-12), key


def table_row(rollout):
    """A rollouts.jsonl record as its row of tracker.py's Markdown table."""
    cell = lambda v: (f"{v:.3f}" if isinstance(v, float) else str(v)).replace("\\", "\\\\").replace("|", "\\|") \
        .replace("\n", " ")
    return "| " + " | ".join(cell(v) for v in rollout.values()) + " |"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The demo GRPO run twice: --report_to tensorboard, and none."""
    root = tmp_path_factory.mktemp("tracker")
    run(grpo, grpo_args(root / "tb", "--report_to", "tensorboard"))
    run(grpo, grpo_args(root / "none"))
    return root


def test_tensorboard_holds_every_number_of_metrics_jsonl_and_one_completions_table(runs):
    records = lines(runs / "tb" / "metrics.jsonl")
    got, texts = tensorboard_scalars(str(runs / "tb" / "tensorboard"))
    assert_same_numbers(got, records)
    names = {k for k, _ in got}
    assert {"reward_accuracy", "reward_format", "reward_fact", "reward_consistency", "kl", "len_mean", "len_max",
            "zero_std_groups", "tokens_per_s", "val_accuracy", "lr", "grad_norm", "pg_loss", "t_step"} <= names
    assert len(got) > 3 * 20 and {s for _, s in got} == {1, 2, 3}
    # one table, at the first step (--log_completions_every 10): the completions rollouts.jsonl has for it
    shown = [r for r in lines(runs / "tb" / "rollouts.jsonl") if r["step"] == 1]
    assert [s for s, _ in texts["completions"]] == [1]
    table = texts["completions"][0][1].splitlines()
    assert table[0] == "| " + " | ".join(shown[0]) + " |"
    assert table[2:] == [table_row(r) for r in shown] and len(shown) == 2
    config = texts["config"][0][1]
    assert "| report_to | tensorboard |" in config and "| max_steps | 3 |" in config


def test_report_to_none_writes_nothing_more_and_trains_the_same(runs):
    files = lambda out: sorted(os.path.relpath(p, out) for p in glob.glob(f"{out}/**", recursive=True)
                               if os.path.isfile(p))
    assert files(runs / "none") == [f for f in files(runs / "tb") if not f.startswith("tensorboard")]
    timed = lambda r: r.startswith("t_") or r == "tokens_per_s"
    same = lambda name: [{k: v for k, v in r.items() if not timed(k)} for r in lines(runs / "none" / name)]
    assert same("metrics.jsonl") == [{k: v for k, v in r.items() if not timed(k)}
                                     for r in lines(runs / "tb" / "metrics.jsonl")]
    assert lines(runs / "none" / "rollouts.jsonl") == lines(runs / "tb" / "rollouts.jsonl")
    assert (runs / "none" / "model.safetensors").read_bytes() == (runs / "tb" / "model.safetensors").read_bytes()


def test_a_resumed_run_continues_the_tensorboard_folder_without_the_steps_it_redoes(runs):
    out = runs / "tb_resumed"
    shutil.copytree(runs / "tb", out)
    before = lines(out / "metrics.jsonl")
    run(grpo, grpo_args(out, "--report_to", "tensorboard", "--resume"))  # from step 2: step 3 again
    after = lines(out / "metrics.jsonl")
    assert after[:2] == before[:2] and after[2]["t_step"] != before[2]["t_step"]  # step 3 ran again
    got, texts = tensorboard_scalars(str(out / "tensorboard"))  # without purge_step: step 3 twice
    assert_same_numbers(got, after)
    assert len(glob.glob(str(out / "tensorboard" / "events.*"))) == 2  # the same folder, one file per process
    assert [s for s, _ in texts["completions"]] == [1, 3]  # the first step each process logged


# -----------------------------------------------------------------------------
# Weights & Biases, offline


def wandb_records(path):
    """The records of a .wandb file, read with wandb's own protobuf schema: a LevelDB-style log of 32 KiB
    blocks, each record in chunks with a 7-byte header (CRC, length, type: 1 whole, 2-4 first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    raw = open(path, "rb").read()
    assert raw[:4] == b":W&B", raw[:7]
    pos, chunk = 7, b""
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # too little of the block is left for a header: padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        chunk, pos = chunk + raw[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def wandb_history(run_dir, wait_s=60):
    """({step: {key: value}}, config) of an offline run folder. wandb's service process writes the file after
    finish() returns: wait for the run's exit record."""
    path, t0 = glob.glob(os.path.join(run_dir, "*.wandb"))[0], time.time()
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)) and time.time() - t0 < wait_s:
        time.sleep(0.5)
    history, config = {}, {}
    for r in wandb_records(path):
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(r.history.step.num, {}).update(row)
        elif r.WhichOneof("record_type") == "run":
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
    return history, config


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))  # nothing written outside tmp_path
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


def test_wandb_offline_run_holds_the_numbers_the_completions_and_the_config_and_resumes_by_id(tmp_path, wandb_offline):
    out = tmp_path / "wb"
    run(grpo, grpo_args(out, "--report_to", "wandb", "--log_completions_every", 2))
    (run_dir,) = glob.glob(str(out / "wandb" / "offline-run-*"))
    run_id = json.load(open(out / "tracker.json"))["wandb"]
    assert run_dir.endswith(run_id)
    history, config = wandb_history(run_dir)
    records = lines(out / "metrics.jsonl")
    got = {(k, step): float(v) for step, row in history.items() for k, v in row.items()
           if not k.startswith("_") and not k.startswith("completions") and isinstance(v, (int, float))}
    assert got == numbers(records)  # JSON both ways: exact
    assert config["report_to"] == "wandb" and config["lr"] == 5e-5 and config["out"] == str(out)
    # the tables: at step 1 and every 2nd step, each the completions rollouts.jsonl holds for its step
    tables = {s: row for s, row in history.items() if "completions/path" in row}
    assert sorted(tables) == [1, 2]
    for step, row in tables.items():
        table = json.load(open(os.path.join(run_dir, "files", row["completions/path"])))
        shown = [r for r in lines(out / "rollouts.jsonl") if r["step"] == step]
        assert table["columns"] == list(shown[0]) and table["data"] == [list(r.values()) for r in shown]
    # resume: the same run id, in a new offline folder, from the step after the checkpoint
    run(grpo, grpo_args(out, "--report_to", "wandb", "--log_completions_every", 2, "--resume"))
    assert json.load(open(out / "tracker.json"))["wandb"] == run_id
    second = [d for d in glob.glob(str(out / "wandb" / "offline-run-*")) if d != run_dir]
    assert len(second) == 1 and second[0].endswith(run_id)
    history, _ = wandb_history(second[0])
    assert sorted(history) == [3] and history[3]["t_step"] == lines(out / "metrics.jsonl")[2]["t_step"]


# -----------------------------------------------------------------------------
# trackio (not in requirements-test.txt: it pins another Pillow)


def test_trackio_run_holds_the_numbers(tmp_path, monkeypatch):
    pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    out = tmp_path / "tk"
    run(grpo, grpo_args(out, "--report_to", "trackio", "--project", "medfact-test"))
    from trackio.sqlite_storage import SQLiteStorage
    logs = SQLiteStorage.get_logs("medfact-test", json.load(open(out / "tracker.json"))["trackio"])
    got = {(k, row["step"]): float(v) for row in logs for k, v in row.items()
           if k not in ("step", "timestamp") and isinstance(v, (int, float))}
    assert got == numbers(lines(out / "metrics.jsonl"))


# -----------------------------------------------------------------------------
# a missing package; SFT


@pytest.mark.parametrize("kind,module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb"),
                                         ("trackio", "trackio")])
def test_a_missing_package_is_one_line_naming_its_install(kind, module, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails, as without the package
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # tracker.py would set it for the process
    args = argparse.Namespace(report_to=kind, out=str(tmp_path), project=None)
    with pytest.raises(SetupError) as e:
        tracker.Tracker(args, 0)
    assert f"pip install {kind}" in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []


def test_a_stage_stops_on_a_missing_package_before_step_1(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SetupError, match="--report_to wandb: wandb is not installed .*pip install wandb"):
        run(grpo, grpo_args(tmp_path / "g", "--report_to", "wandb"))
    assert lines(tmp_path / "g" / "metrics.jsonl") == []  # no step ran


def test_sft_logs_its_metrics_jsonl_to_tensorboard(tmp_path):
    """A skipped step (its loss None) and a held-out loss at step 3: each number, and nothing else."""
    (tmp_path / "images").mkdir()
    with open(tmp_path / "pseudo.jsonl", "w") as f:
        for i, r in enumerate(data.load("demo", "train")[:8]):
            data.load_image(r).save(tmp_path / "images" / f"{i}.png")
            row = {k: r[k] for k in ("id", "question", "answer", "answer_type", "keywords")}
            f.write(json.dumps({**row, "image": f"images/{i}.png",
                                "target": f"<think>It shows.</think><answer>{r['answer']}</answer>"}) + "\n")
    out = tmp_path / "sft"
    run(sft, ["--data", tmp_path / "pseudo.jsonl", "--model", "tiny", "--out", out, "--batch_size", 4, "--max_steps", 3,
              "--val_frac", 0.25, "--eval_every", 3, "--warmup", 1, "--debug_nan_steps", 2, "--report_to", "tensorboard"])
    records = lines(out / "metrics.jsonl")
    assert records[1]["loss"] is None and "val_loss" in records[2]  # the cases the comparison must cover
    got, texts = tensorboard_scalars(str(out / "tensorboard"))
    assert_same_numbers(got, records)
    assert got[("skipped", 2)] == 1.0 and ("loss", 2) not in got and ("val_loss", 3) in got
    assert sorted(texts) == ["config"]  # SFT has no completions
