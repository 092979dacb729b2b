"""The rewards as TRL reward functions and as verl's compute_score: hand-worked values through
each signature, chat completions unwrapped, missing columns, and a real 2-step TRL GRPOTrainer
run (skipped without trl). Only the last test needs anything beyond pytest."""

import pickle
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import rewards  # noqa: E402
from rewards import (TRLReward, completion_text, compute_score, score, trl_accuracy,  # noqa: E402
                     trl_consistency, trl_fact, trl_format, trl_total)


def c(think, answer):
    return f"<think>{think}</think><answer>{answer}</answer>"


# Two prompts, two completions each (prompt-major, as TRL orders them); the values by hand:
#                                                     accuracy format fact consistency total
# 0 closed, "yes": meniscus + effusion, says present     1      1     1       1        4
# 1 closed, "yes": effusion only, concludes "no ..."     1      1    1/2      0       2.5
# 2 open "upper zone" (no keywords): exact answer        1      1     0       1        3
# 3 open: "zone", half the gold words, in the conclusion 1/2    1     0       1       2.5
COMPLETIONS = [
    c("The image shows a meniscus. So, a pleural effusion is present.", "yes"),
    c("The angles are sharp. So, there is no pleural effusion.", "yes"),
    c("A round opacity above the clavicle. So, the nodule is in the upper zone.", "upper zone"),
    c("So, the nodule is in the upper zone.", "zone"),
]
COLUMNS = {"answer": ["yes", "yes", "upper zone", "upper zone"],
           "answer_type": ["closed", "closed", "open", "open"],
           "keywords": [["pleural effusion", "meniscus"]] * 2 + [None, None]}
EXPECTED = {"accuracy": [1, 1, 1, 0.5], "format": [1, 1, 1, 1], "fact": [1, 0.5, 0, 0],
            "consistency": [1, 0, 1, 1], "total": [4, 2.5, 3, 2.5]}
PARTS = [trl_accuracy, trl_format, trl_fact, trl_consistency]

# what TRL passes besides the dataset's columns (GRPOTrainer._calculate_rewards, TRL 1.16)
TRL_EXTRAS = {"completion_ids": [[1, 2]] * 4, "trainer_state": object(), "log_extra": print, "log_metric": print}


def chat(text):
    return [{"role": "assistant", "content": text}]


def test_trl_functions_hand_worked_values_and_names():
    prompts = ["Is there a pleural effusion?"] * 2 + ["Where is the nodule?"] * 2
    for fn in PARTS + [trl_total]:
        out = fn(prompts, COMPLETIONS, **COLUMNS, **TRL_EXTRAS)
        assert out == EXPECTED[fn.__name__] and len(out) == len(COMPLETIONS), fn
    # TRL logs rewards/<__name__>/mean: one sensible name per part
    assert [fn.__name__ for fn in PARTS] == list(rewards.REWARDS) and trl_total.__name__ == "total"
    # the parts add up to the total (TRL sums its reward functions with weight 1 each)
    sums = [sum(v) for v in zip(*(fn(prompts, COMPLETIONS, **COLUMNS) for fn in PARTS))]
    assert sums == trl_total(prompts, COMPLETIONS, **COLUMNS)


def test_trl_functions_read_chat_completions_like_strings():
    prompts = [[{"role": "user", "content": "q"}]] * 4
    as_messages = [chat(t) for t in COMPLETIONS]
    as_parts = [[{"role": "assistant", "content": [{"type": "text", "text": t[:20]}, {"type": "text", "text": t[20:]}]}]
                for t in COMPLETIONS]
    for completions in (as_messages, as_parts):
        assert trl_total(prompts, completions, **COLUMNS) == EXPECTED["total"]
    # the last message is the model's answer (a tool call and its result may come first)
    turns = [{"role": "assistant", "content": "calling a tool"}, {"role": "tool", "content": "result"},
             {"role": "assistant", "content": COMPLETIONS[0]}]
    assert completion_text(turns) == COMPLETIONS[0]
    assert trl_format(["q"], [turns], answer=["yes"]) == [1.0]
    for bad in (None, 3, [], [{"role": "assistant"}], ["not a message"]):
        with pytest.raises(TypeError):
            trl_total(["q"], [bad], answer=["yes"])


def test_trl_functions_missing_columns_and_list_lengths():
    # keywords missing altogether (no such column) or None in a row: fact 0, nothing else moves
    no_keywords = {k: v for k, v in COLUMNS.items() if k != "keywords"}
    assert trl_fact(["q"] * 4, COMPLETIONS, **no_keywords) == [0, 0, 0, 0]
    assert trl_total(["q"] * 4, COMPLETIONS, **no_keywords, keywords=None) == [3, 2, 3, 2.5]
    # answer_type missing: a yes/no gold answer makes the question closed, as score() reads rows
    only_answers = {"answer": COLUMNS["answer"]}
    assert trl_accuracy(["q"] * 4, COMPLETIONS, **only_answers) == EXPECTED["accuracy"]
    with pytest.raises(KeyError, match="answer"):
        trl_accuracy(["q"] * 4, COMPLETIONS, answer_type=COLUMNS["answer_type"])
    with pytest.raises(ValueError, match="keywords"):
        trl_fact(["q"] * 4, COMPLETIONS, answer=COLUMNS["answer"], keywords=COLUMNS["keywords"][:3])
    assert trl_total([], [], answer=[]) == []


def test_trl_factory_weights_upstream_judge_and_pickling():
    weighted = TRLReward("total", {"fact": 0.0, "accuracy": 2.0})
    assert weighted(["q"] * 4, COMPLETIONS, **COLUMNS) == [4, 3, 4, 3]  # 2a + f + c
    with pytest.raises(ValueError, match="reward_weights"):
        TRLReward("fact", {"fact": 0.5})  # a part's weight belongs in GRPOConfig(reward_weights=...)
    with pytest.raises(ValueError, match="unknown reward"):
        TRLReward("consistent")
    # upstream: the released substring accuracy finds "no" in "nodule"; ours does not
    hack = [c("So, a nodule.", "nodule")]
    assert trl_accuracy(["q"], hack, answer=["no"]) == [0.0]
    assert TRLReward("accuracy", upstream=True)(["q"], hack, answer=["no"]) == [1.0]
    # the judge decides consistency; the other parts never ask it
    calls = []
    judge = lambda prompt: calls.append(prompt) or "No"  # noqa: E731
    assert TRLReward("consistency", judge=judge)(["q"] * 4, COMPLETIONS, **COLUMNS) == [0, 0, 0, 0]
    assert len(calls) == 4 and "Where is the nodule?" not in calls[0]
    calls.clear()
    assert TRLReward("accuracy", judge=judge)(["q"] * 4, COMPLETIONS, **COLUMNS) == EXPECTED["accuracy"]
    assert calls == []
    # the question column reaches the judge's prompt
    TRLReward("total", judge=judge)(["q"], COMPLETIONS[:1], answer=["yes"], question=["Is there fluid?"])
    assert "Question: Is there fluid?" in calls[0]
    # picklable (TRL's async rollout worker pickles reward functions into a child process)
    for fn in PARTS + [trl_total]:
        again = pickle.loads(pickle.dumps(fn))
        assert again.__name__ == fn.__name__
        assert again(["q"] * 4, COMPLETIONS, **COLUMNS) == EXPECTED[fn.__name__]


def test_score_refuses_a_non_string_completion():
    example = {"answer": "yes", "answer_type": "closed", "keywords": ["pleural effusion", "meniscus"]}
    assert score(COMPLETIONS[0], example)["total"] == 4.0
    # once scored as the list's repr (format 0, total 3.0): now an error that says what to do
    with pytest.raises(TypeError, match="completion_text"):
        score(chat(COMPLETIONS[0]), example)
    assert score(completion_text(chat(COMPLETIONS[0])), example)["total"] == 4.0

# -----------------------------------------------------------------------------
# verl


def verl_call(solution_str, ground_truth, extra_info, **reward_kwargs):
    # as verl's NaiveRewardManager calls custom_reward_function: keyword arguments, one response
    return compute_score(data_source="medfact", solution_str=solution_str, ground_truth=ground_truth,
                         extra_info=extra_info, **reward_kwargs)


def test_verl_compute_score_hand_worked():
    info = {"answer_type": "closed", "keywords": ["pleural effusion", "meniscus"]}
    assert verl_call(COMPLETIONS[0], "yes", info) == {"score": 4.0, "accuracy": 1.0, "format": 1.0,
                                                      "fact": 1.0, "consistency": 1.0}
    assert verl_call(COMPLETIONS[1], "yes", info) == {"score": 2.5, "accuracy": 1.0, "format": 1.0,
                                                      "fact": 0.5, "consistency": 0.0}
    # extra_info None (or empty): no keywords, and "yes" as gold makes the question closed
    for empty in (None, {}):
        assert verl_call(COMPLETIONS[0], "yes", empty) == {"score": 3.0, "accuracy": 1.0, "format": 1.0,
                                                           "fact": 0.0, "consistency": 1.0}
    # open question; keywords as a tuple (how a parquet list may come back); verl's own extras
    # in extra_info and its reward loop's keyword arguments are ignored
    open_info = {"answer_type": "open", "keywords": ("upper zone",), "num_turns": 1, "response_len": 30}
    assert verl_call(COMPLETIONS[3], "upper zone", open_info, reward_router_address=None,
                     reward_model_tokenizer=None) == {"score": 3.5, "accuracy": 0.5, "format": 1.0,
                                                      "fact": 1.0, "consistency": 1.0}
    # custom_reward_function.reward_kwargs: weights and upstream
    weighted = verl_call(COMPLETIONS[1], "yes", info, weights={"fact": 0.0})
    assert weighted["score"] == 2.0 and weighted["fact"] == 0.5
    assert verl_call(c("So, a nodule.", "nodule"), "no", None, upstream=True)["accuracy"] == 1.0
    assert verl_call(c("So, a nodule.", "nodule"), "no", None)["accuracy"] == 0.0
    # every call returns the same keys (verl stacks them per key into reward_extra_info)
    assert list(verl_call("", "yes", None)) == ["score", "accuracy", "format", "fact", "consistency"]
    with pytest.raises(TypeError):
        verl_call(None, "yes", None)


def test_verl_keywords_as_a_numpy_array():
    np = pytest.importorskip("numpy")
    info = {"answer_type": "closed", "keywords": np.array(["pleural effusion", "meniscus"], dtype=object)}
    assert verl_call(COMPLETIONS[1], "yes", info)["fact"] == 0.5

# -----------------------------------------------------------------------------
# a real TRL run


def scripted_policy(tokenizer, prompt_end, completion, hidden_size=64):
    """A tiny text-only Qwen2 that writes `completion` after `prompt_end`, whatever it samples
    at temperature 1: attention and MLP outputs are zeroed, so each position's logits depend on
    its own token only, and the output head maps each token to the next one with a margin of
    tens of nats. A random policy would score 0 on every reward, which no adapter bug changes."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    chain = [prompt_end] + tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert len(set(chain[:-1])) == len(chain) - 1  # one successor per token
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        h = model.model.norm(model.model.embed_tokens.weight)  # (V, D): the last hidden state of each token
        model.lm_head.weight.zero_()
        for token, successor in zip(chain, chain[1:]):
            model.lm_head.weight[successor] = 10 * h[token] / h[token].norm()
    return model


def test_trl_grpo_trainer_two_steps_logs_each_reward(tmp_path):
    """TRL's GRPOTrainer, 2 steps on CPU with no download, the four parts as its reward
    functions, conversational prompts (so completions arrive as messages) and a keywords
    column with a None. The policy always answers "<think>So, yes.</think><answer>yes</answer>";
    by hand, on 2 closed "yes" rows and 2 open "upper zone" rows: accuracy 1/2 (the closed
    rows), format 1, fact 0 (no keyword in "So, yes."), consistency 1 (closed: a positive
    conclusion and "yes"; open: the answer's word "yes" is in the conclusion), reward 2.5."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    import scratch

    rows = [{"question": "Is there a pleural effusion?", "answer": "yes", "answer_type": "closed",
             "keywords": ["pleural effusion", "meniscus"]},
            {"question": "Where is the nodule?", "answer": "upper zone", "answer_type": "open", "keywords": None}]
    answer = "<think>So, yes.</think><answer>yes</answer>"
    tokenizer = scratch.build_tokenizer([answer] + COMPLETIONS + [r["question"] for r in rows], vocab_size=400)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "q"}], add_generation_prompt=True, tokenize=False)
    prompt_end = tokenizer(prompt, add_special_tokens=False).input_ids[-1]  # where every completion starts
    model = scripted_policy(tokenizer, prompt_end, answer)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}],
                                  **{k: r[k] for k in ("answer", "answer_type", "keywords")}} for r in rows * 2])

    seen = []  # what TRL handed the accuracy reward, and what it returned

    class Spy(TRLReward):
        def __call__(self, prompts, completions, **columns):
            out = super().__call__(prompts, completions, **columns)
            seen.append((completions, columns["answer"], out))
            return out

    config = GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, num_generations=2,
                        max_completion_length=16, temperature=1.0, learning_rate=1e-3, beta=0.0, seed=0,
                        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
                        dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[Spy("accuracy"), trl_format, trl_fact, trl_consistency],
                          args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

    assert trainer.state.global_step == 2
    logs = [log for log in trainer.state.log_history if "reward" in log]
    assert len(logs) == len(seen) == 2
    for log, (completions, answers, out) in zip(logs, seen):
        print({k: round(v, 4) for k, v in log.items() if k.startswith("reward")})
        means = {part: log[f"rewards/{part}/mean"] for part in rewards.REWARDS}
        assert means == {"accuracy": 0.5, "format": 1.0, "fact": 0.0, "consistency": 1.0}
        assert log["reward"] == 2.5
        # conversational data: each completion is a list of messages, unwrapped before scoring
        assert [completion_text(m) for m in completions] == [answer] * 4
        assert sorted(answers) == ["upper zone", "upper zone", "yes", "yes"] and sorted(out) == [0, 0, 1, 1]
