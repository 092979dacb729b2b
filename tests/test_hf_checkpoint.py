"""A saved checkpoint in stock transformers: the README's snippet, run as written, gives evaluate.py's greedy
tokens on 8 batched demo questions.

The model is the untrained tiny one (its greedy output is long and chaotic, so it is sensitive to every
trap: with right padding 3 of these 8 answers match, without mm_token_type_ids or without the instruction
none does)."""
import json
import os
import re

import pytest
import torch

import checkpoint
import data
import families
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW_TOKENS = 128  # evaluate.py's default
INPUTS = ("ckpt", "images", "questions")  # what the snippet's user supplies; the test supplies its own


def readme_snippet():
    """The README's "Use a trained checkpoint with transformers" code, without the lines that set INPUTS."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Use a trained checkpoint with transformers", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    lines = code.splitlines()
    given = [line for line in lines if line.split(" = ")[0] in INPUTS]
    assert len(given) == len(INPUTS), f"the snippet no longer sets {INPUTS} on lines of their own"
    return "\n".join(line for line in lines if line not in given)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    vlm = M.load("tiny", texts=data.tokenizer_texts)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    checkpoint.save_checkpoint(path, vlm, {"step": 0})
    rows = data.load("demo", "test")[:32:4]  # 8 images, questions of several kinds and lengths
    return vlm, path, rows


def test_readme_snippet_gives_evaluates_greedy_tokens(saved):
    vlm, path, rows = saved
    images, questions = [data.load_image(r) for r in rows], [r["question"] for r in rows]
    # evaluate.py's path: model.generate (greedy, one batch), and the tokens model.sample decoded
    expected_texts = M.generate(vlm, images, questions, MAX_NEW_TOKENS)
    ours = M.sample(vlm, vlm.encode(images, questions), 1, MAX_NEW_TOKENS, temperature=0.0)
    expected = [t[:int(m.sum())] for t, m in zip(ours["tokens"].tolist(), ours["mask"])]
    assert all(len(t) > 10 for t in expected) and len(set(expected_texts)) == len(rows)  # non-trivial outputs

    scope = {"ckpt": path, "images": images, "questions": questions}
    exec(readme_snippet(), scope)  # plain transformers only: the snippet imports nothing from medfact

    inputs, out = scope["inputs"], scope["out"]
    assert set(inputs) >= {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"}
    got = out[:, inputs["input_ids"].shape[1]:]
    got = [t[:int(m.sum())] for t, m in zip(got.tolist(), M.completion_mask(got, vlm.eos_id))]
    same = sum(a == b for a, b in zip(got, expected))
    # the prompts, token for token, as vlm.encode builds them (chat template, instruction, left padding)
    prompts_equal = torch.equal(inputs["input_ids"], vlm.encode(images, questions)["input_ids"].cpu())
    assert same == len(rows) and prompts_equal, f"{same}/{len(rows)} token-identical; same prompts: {prompts_equal}"
    assert scope["answers"] == expected_texts


def test_checkpoint_files_say_left_padding_template_and_processor(saved):
    vlm, path, rows = saved
    from transformers import AutoTokenizer
    config = json.load(open(os.path.join(path, "tokenizer_config.json")))
    assert config["padding_side"] == "left" and config["image_token"] == "<|image_pad|>"
    assert json.load(open(os.path.join(path, "processor_config.json")))["processor_class"] == "PaddleOCRVLProcessor"
    tokenizer = AutoTokenizer.from_pretrained(path)
    # text-only and with an image, with and without the instruction, a system turn given or not
    for instruction in (families.INSTRUCTION, ""):
        kw = {} if instruction == families.INSTRUCTION else {"instruction": instruction}
        for content, n_img in (("Is the heart enlarged?", 0),
                               ([{"type": "image"}, {"type": "text", "text": "Is the heart enlarged?"}], 1)):
            for system in ([], [{"role": "system", "content": families.SYSTEM}]):
                text = tokenizer.apply_chat_template(system + [{"role": "user", "content": content}],
                                                     add_generation_prompt=True, tokenize=False, **kw)
                assert text == families.chat_prompt("Is the heart enlarged?", n_img, instruction)
    # saving leaves the model's own tokenizer as training uses it
    assert vlm.tokenizer.padding_side == "right" and not hasattr(vlm.tokenizer, "image_token")
    assert M.load(path).tokenizer("<think>").input_ids == vlm.tokenizer("<think>").input_ids
