"""The defects a review found in the GRPO and evaluation path (issue #34), one test each, every one failing on
the code before its fix: gradients averaged in buckets when ranks differ in which parameters got one; the
first inner epoch's ratio is 1 with dropout in the model; held-out selection decodes in evaluate.py's dtype;
a resumed run never hands back a best model from after its checkpoint; only rank 0 reads and renames
checkpoints on the stop path; --inner_epochs 0 is a one-line refusal; --seed draws a from-scratch model's
initial weights."""
import datetime
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

import checkpoint
import common
import data
import evaluate
import grpo
import model as M
import sft

TEXTS = ["Is there a pleural effusion? <think>The image shows fluid.</think><answer>yes</answer>"] * 20


def run(stage, argv):
    stage.main(stage.parser.parse_args([str(a) for a in argv]))


def grpo_args(out, *extra):
    return ["--ckpt", "tiny", "--data", "demo", "--out", out, "--prompts_per_step", 4, "--group_size", 2,
            "--max_new_tokens", 8, "--micro_batch", 4, "--max_steps", 3, "--eval_every", 0, "--upstream_rewards",
            *extra]


# -----------------------------------------------------------------------------
# 1. allreduce_grads: buckets, and ranks that differ in which parameters got a gradient


def _reduce_worker(rank, init, out):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=60))
    sizes = []
    real = torch.distributed.all_reduce

    def spy(t, *a, **k):  # what each collective moves
        sizes.append(t.numel() * t.element_size())
        return real(t, *a, **k)
    torch.distributed.all_reduce = spy
    params = [torch.nn.Parameter(torch.zeros(n, dtype=dt)) for n, dt in
              ((10, torch.float32), (300, torch.float32), (7, torch.bfloat16), (4, torch.float32))]
    for i, p in enumerate(params[:3]):  # rank 0 got no gradient for params[1]; nobody for params[3]
        if rank == 1 or i != 1:
            p.grad = torch.arange(p.numel(), dtype=torch.float32).to(p.dtype) * (rank + 1) + i
    common.allreduce_grads(params, bucket_mb=400 / 2 ** 20)  # 400 bytes: several buckets
    torch.save({"grads": [None if p.grad is None else p.grad.float() for p in params], "sizes": sizes[1:]}, out[rank])
    torch.distributed.destroy_process_group()


def test_allreduce_grads_in_buckets_when_ranks_differ_in_which_params_got_a_gradient(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    out = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    ctx = mp.start_processes(_reduce_worker, args=(init, out), nprocs=2, join=False, start_method="spawn")
    while not ctx.join(timeout=120):
        pass
    got = [torch.load(o) for o in out]
    base = [torch.arange(n, dtype=torch.float32) for n in (10, 300, 7)]
    want = [(base[0] * 1 + 0 + base[0] * 2 + 0) / 2,  # both ranks
            (torch.zeros(300) + base[1] * 2 + 1) / 2,  # rank 1 only: rank 0 counts as zeros, as DDP does
            (base[2] * 1 + 2 + base[2] * 2 + 2) / 2]
    for g in got:
        for w, x in zip(want, g["grads"][:3]):
            assert torch.allclose(x, w.bfloat16().float() if x.numel() == 7 else w)
        assert g["grads"][3] is None  # no rank had one: it stays None (AdamW skips it), as before
        assert max(g["sizes"]) <= 400 or len(g["sizes"]) > 2  # buckets, not one flat copy of everything
        assert sum(g["sizes"]) == (10 + 300) * 4 + 7 * 2  # every gradient reduced exactly once
    assert got[0]["grads"][1].equal(got[1]["grads"][1])


# -----------------------------------------------------------------------------
# 5. dropout: the training forward sees the policy the rollouts and old_logps saw


def test_the_policy_has_no_dropout_so_train_and_eval_forwards_agree(tmp_path):
    vlm = M.load("tiny", texts=data.tokenizer_texts)
    vlm.model.config.text_config.attention_dropout = 0.5  # a model that ships with dropout
    checkpoint.save_checkpoint(str(tmp_path / "drop"), vlm)
    args = grpo.parser.parse_args(["--ckpt", str(tmp_path / "drop"), "--kl_coef", "0"])
    vlm, _ = grpo.load_models(args, torch.device("cpu"), None)
    rows = data.load("demo", "train")[:2]
    batch = vlm.encode([data.load_image(r) for r in rows], [r["question"] for r in rows])
    tokens = M.sample(vlm, batch, 2, 8, 1.0, M.rollout_seeds(0, 0, [0, 1], 2))["tokens"]
    vlm.model.eval()
    with torch.no_grad():
        old = M.completion_logps(vlm, batch, tokens, 2)  # frozen_logps: eval mode
    vlm.model.train()
    torch.manual_seed(1)
    new = M.completion_logps(vlm, batch, tokens, 2)  # the training forward: train mode
    assert torch.equal(torch.exp(new - old), torch.ones_like(old))  # the first inner epoch's ratio is 1


# -----------------------------------------------------------------------------
# 4. held-out selection scores the model as evaluate.py will


def test_held_out_selection_decodes_in_the_dtype_evaluate_loads_the_model_in(monkeypatch):
    vlm = M.load("tiny", texts=TEXTS)  # fp32, as grpo.py trains without --bf16
    rows = [{"question": "q", "answer": "yes", "answer_type": "closed"}] * 2
    seen = []

    def generate(v, images, questions, *a, **k):
        seen.append(next(v.model.parameters()).dtype)
        return ["<answer>yes</answer>"] * len(questions)
    monkeypatch.setattr(M, "generate", generate)
    monkeypatch.setattr(evaluate, "default_dtype", lambda device: torch.bfloat16)  # evaluate.py's on CUDA
    scores = evaluate.held_out_scores(vlm, rows, 8, 0, 1, torch.device("cpu"), images=lambda r: None)
    assert seen == [torch.bfloat16] and scores["val_accuracy"] == 1.0
    assert next(vlm.model.parameters()).dtype == torch.float32  # the policy itself is untouched
    monkeypatch.setattr(evaluate, "default_dtype", lambda device: torch.float32)  # CPU: the policy as it is
    evaluate.held_out_scores(vlm, rows, 8, 0, 1, torch.device("cpu"), images=lambda r: None)
    assert seen[-1] == torch.float32


# -----------------------------------------------------------------------------
# 6. a resumed run and OUT/best


def test_a_resumed_run_never_hands_back_a_best_from_after_its_checkpoint(tmp_path, monkeypatch):
    """Run A checkpoints at step 2 (best so far: step 2, 0.3), saves OUT/best at step 3 (0.9), and dies at
    step 4. Resumed from step 2 (steps 3 and 4 now score 0.4 and 0.5), the run must select step 4, not
    hand back A's step 3, which it never reproduced."""
    keys = ("val_accuracy", "val_open_accuracy", "val_open_recall")

    def scripted(scores):
        it = iter(scores)

        def score(*a, **k):
            s = next(it)
            if s is None:
                raise KeyboardInterrupt  # killed
            return dict(zip(keys, s))
        monkeypatch.setattr(grpo, "held_out_scores", score)

    out = tmp_path / "run"
    argv = grpo_args(out, "--max_steps", 4, "--val_data", "demo", "--eval_every", 1, "--val_limit", 4,
                     "--save_every", 2)
    scripted([(0.1, 0.4, 0.4), (0.2, 0.4, 0.4), (0.3, 0.4, 0.4), (0.9, 0.4, 0.4), None])
    with pytest.raises(KeyboardInterrupt):
        run(grpo, argv)
    assert checkpoint.load_state(str(out / "best"))["step"] == 3
    scripted([(0.4, 0.4, 0.4), (0.5, 0.4, 0.4)])
    run(grpo, argv + ["--resume"])
    state = json.load(open(out / "state.json"))
    assert state["selected"] == {"step": 4, "val_accuracy": 0.5, "val_open_accuracy": 0.4, "val_open_recall": 0.4}
    assert state["start"]["val_accuracy"] == 0.1  # the starting model's scores came back with the checkpoint


# -----------------------------------------------------------------------------
# 7. the stop path under torchrun


def test_only_rank_0_reads_and_renames_checkpoints_on_the_stop_path(tmp_path, monkeypatch):
    step = tmp_path / "checkpoints" / "step_0000002"
    step.mkdir(parents=True)
    (step / "state.json").write_text("{}")
    (step / "model.safetensors").write_bytes(b"")
    read = []
    monkeypatch.setattr(checkpoint, "_finite_weights", lambda folder: read.append(folder) or True)
    monkeypatch.setitem(common._DIST, "rank", 1)  # this process is rank 1 of 2
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)

    def broadcast(objects, src):  # rank 0's answer
        objects[0] = (str(step), [])
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast)
    assert checkpoint.last_good_checkpoint(str(tmp_path), 3) == (str(step), [])  # step 2 set aside on rank 0
    assert read == [] and step.exists()  # rank 1 read no weights and renamed nothing


# -----------------------------------------------------------------------------
# 8. --inner_epochs 0; and --seed


def test_inner_epochs_zero_is_a_one_line_refusal(tmp_path):
    with pytest.raises(common.SetupError, match="--inner_epochs 0"):
        run(grpo, grpo_args(tmp_path / "g", "--inner_epochs", 0))


def test_the_seed_draws_a_from_scratch_models_initial_weights(tmp_path):
    a, b, c = (M.load("tiny", texts=TEXTS, seed=s).model.state_dict() for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sum(not torch.equal(a[k], c[k]) for k in a) > len(a) / 2
    # and sft.py's --seed reaches it: one step at lr 0 leaves each run's initial weights
    (tmp_path / "images").mkdir()
    with open(tmp_path / "pseudo.jsonl", "w") as f:
        for i, r in enumerate(data.load("demo", "train")[:4]):
            data.load_image(r).save(tmp_path / "images" / f"{i}.png")
            f.write(json.dumps({**{k: r[k] for k in ("id", "question", "answer", "answer_type")},
                                "image": f"images/{i}.png", "target": f"<answer>{r['answer']}</answer>"}) + "\n")
    for s in (0, 1):
        run(sft, ["--data", tmp_path / "pseudo.jsonl", "--out", tmp_path / f"s{s}", "--batch_size", 4,
                  "--max_steps", 1, "--val_frac", 0.0, "--lr", 0.0, "--seed", s])
    from safetensors.torch import load_file
    w0, w1 = (load_file(os.path.join(tmp_path, f"s{s}", "model.safetensors")) for s in (0, 1))
    assert sum(not torch.equal(w0[k], w1[k]) for k in w0) > len(w0) / 2
