"""Hand-worked tables for the four rewards (adversarial rows included), the upstream switch,
the judge (with a local HTTP server that answers or stalls), and a fuzz over ranges.
Everything runs offline in a couple of seconds."""

import ast
import http.server
import json
import math
import random
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import rewards  # noqa: E402
from rewards import (accuracy_reward, consistency_reward, extract_think, fact_reward,  # noqa: E402
                     format_reward, make_openai_judge, normalize_answer, open_recall,
                     parse_answer, parse_answer_lenient, score)


def c(think, answer):
    return f"<think>{think}</think><answer>{answer}</answer>"


# the pseudo-label writer's traces (retrieve.py): a positive, a negative, an open one
POSITIVE = ("The question asks about pleural effusion. Pleural effusion is fluid in the pleural space "
            "that blunts the costophrenic angle. The image shows a meniscus at the left lung base. "
            "So, a pleural effusion is present.")
NEGATIVE = POSITIVE.replace("The image shows a meniscus at the left lung base. So, a pleural effusion is present.",
                            "The costophrenic angles are sharp. So, there is no pleural effusion.")
UPPER = ("The question asks where the nodule is. A nodule is a small round opacity. The image shows a "
         "round opacity above the clavicle. So, the nodule is in the upper zone.")

YES = {"answer": "yes", "answer_type": "closed", "keywords": ["pleural effusion", "costophrenic angle", "meniscus"]}
NO = {"answer": "No", "answer_type": " CLOSED ", "keywords": ["pleural effusion", "costophrenic angle"]}
OPEN = {"answer": "upper zone", "answer_type": "open", "keywords": ["nodule", "upper zone"]}
LEFT = {"answer": "Left lung", "answer_type": "Open", "keywords": []}
TWO = {"answer": 2, "answer_type": "open"}                 # VQA-RAD has integer answers
CT = {"answer": "CT", "answer_type": "open"}
CHOICE = {"answer": "liver", "answer_type": "closed"}      # SLAKE: closed but not yes/no
UNTYPED = {"answer": "Yes"}                                 # no answer_type: yes/no gold -> closed

# -----------------------------------------------------------------------------
# accuracy

ACCURACY = [
    # (completion, example, expected)
    (c(POSITIVE, "yes"), YES, 1.0),
    (c(POSITIVE, " Yes. "), YES, 1.0),
    (c(POSITIVE, "YES!!!"), YES, 1.0),
    (c(POSITIVE, "Yes, there is a pleural effusion."), YES, 1.0),
    (c(POSITIVE, "\uff39\uff25\uff33"), YES, 1.0),                  # full-width YES, NFKC
    (c(POSITIVE, "yes or no"), YES, 0.0),                           # hedge: both polarities
    (c(POSITIVE, "possibly yes, maybe no"), YES, 0.0),
    (c(POSITIVE, "yes, likely"), YES, 0.0),                          # hedge word
    (c(POSITIVE, "yes/no"), YES, 0.0),
    (c(POSITIVE, "no"), YES, 0.0),
    (c(NEGATIVE, "No evidence of effusion."), NO, 1.0),             # one polarity: no
    (c(NEGATIVE, "not"), NO, 0.0),                                   # "not" is not "no"
    (c("There is a nodule in a normal lung.", "a nodule"), NO, 0.0),  # "no" inside words
    ("<think>So the answer is yes.</think>", YES, 0.0),              # answer only in the reasoning
    ("yes", YES, 0.0),                                               # no answer block at all
    (c(POSITIVE, "no") + "<answer>yes</answer>", YES, 1.0),          # the last block is graded
    (c(POSITIVE, "yes") + "<answer>no</answer>", YES, 0.0),
    (c(POSITIVE, "yes") + "<answer>no", YES, 0.0),                   # unclosed last block: no answer
    (c(POSITIVE, ""), YES, 0.0),
    (c(POSITIVE, "   "), YES, 0.0),
    (c(POSITIVE, "yes " + "!" * 2000), YES, 0.0),                    # over MAX_ANSWER_CHARS
    (c(POSITIVE, "yes"), UNTYPED, 1.0),
    (c(UPPER, "Upper zone"), OPEN, 1.0),
    (c(UPPER, "the upper zone."), OPEN, 1.0),                        # article and full stop dropped
    (c(UPPER, "zone upper"), OPEN, 1.0),                             # same words, other order
    (c(UPPER, "upper"), OPEN, 0.5),                                  # strict sub-answer: 1 of 2 words
    (c(UPPER, "upper zone or lower zone"), OPEN, 0.0),               # listing adds wrong words
    (c(UPPER, "upper lower middle zone"), OPEN, 0.0),
    (c(UPPER, "upperzone"), OPEN, 0.0),
    (c(UPPER, "zones"), OPEN, 0.0),                                  # no plural matching, as in evaluation
    (c("...", "left"), LEFT, 0.5),
    (c("...", "left right"), LEFT, 0.0),
    (c("...", "two"), TWO, 1.0),                                     # number words -> digits
    (c("...", "2"), TWO, 1.0),
    (c("...", "fact"), CT, 0.0),                                     # "ct" inside "fact"
    (c("...", "CT scan"), CT, 0.0),                                  # extra word: no partial credit
    (c("...", "Liver"), CHOICE, 1.0),
    (c("...", "liver or kidney"), CHOICE, 0.0),
    (c("...", "liver kidney"), CHOICE, 0.0),
    ("", YES, 0.0),
    ("<answer><answer>yes</answer>", YES, 1.0),                      # tag soup: last <answer>, its close
]


@pytest.mark.parametrize("completion,example,expected", ACCURACY)
def test_accuracy_table(completion, example, expected):
    assert accuracy_reward(completion, example) == expected

# -----------------------------------------------------------------------------
# format

FORMAT = [
    (c(POSITIVE, "yes"), 1.0),
    (c("line one\nline two\n\nSo, yes.", "yes"), 1.0),              # multi-line reasoning
    ("  <think> a </think>\n\n<answer> b </answer>\n", 1.0),          # whitespace around and between
    ("<think>\n</think><answer>yes</answer>", 0.0),                  # empty think
    ("<think>a</think><answer>  </answer>", 0.0),                    # empty answer
    (c("a", "yes") + "<answer>no</answer>", 0.0),                    # two answers
    ("<think>a</think><think>b</think><answer>yes</answer>", 0.0),   # two thinks
    (c("a", "yes") + " and more", 0.0),                              # text after the answer
    ("Sure! " + c("a", "yes"), 0.0),                                 # text before the think
    ("<think>a</think> so <answer>yes</answer>", 0.0),               # text between the blocks
    ("<answer>yes</answer><think>a</think>", 0.0),                   # wrong order
    ("<think>a</think>", 0.0),
    ("", 0.0),
    ("<think><answer></think></answer>", 0.0),                       # tag soup
    ("<think>a<think>b</think></think><answer>c</answer>", 0.0),      # nested
    ("<THINK>a</THINK><ANSWER>yes</ANSWER>", 0.0),                   # tags are case-sensitive
    ("<think>a</think><answer>yes", 0.0),                            # truncated
]


@pytest.mark.parametrize("completion,expected", FORMAT)
def test_format_table(completion, expected):
    assert format_reward(completion) == expected

# -----------------------------------------------------------------------------
# fact

EFFUSION = {"answer": "yes", "answer_type": "closed", "keywords": ["pleural effusion", "costophrenic angle", "meniscus"]}
FACT = [
    (c(POSITIVE, "yes"), EFFUSION, 1.0),
    (c("Pleural effusion blunts the costophrenic angle.", "yes"), EFFUSION, 2 / 3),
    (c("Bilateral PLEURAL EFFUSIONS; both costophrenic angles blunted.", "yes"), EFFUSION, 2 / 3),  # plural, case
    (c("pleural effusion " * 50, "yes"), EFFUSION, 1 / 3),          # repetition earns nothing
    (c("effusion", "pleural effusion costophrenic angle meniscus"), EFFUSION, 0.0),  # keywords outside think
    ("pleural effusion, costophrenic angle, meniscus", EFFUSION, 0.0),  # no think block
    (c("pleuraleffusion, a premeniscus", "yes"), EFFUSION, 0.0),     # not whole words
    (c("\uff50\uff4c\uff45\uff55\uff52\uff41\uff4c effusion", "yes"), EFFUSION, 1 / 3),  # full-width, NFKC
    (c("A chest radiograph.", "no"), {"answer": "no", "keywords": ["X-ray"]}, 1.0),  # synonym
    (c("An xray of the chest.", "no"), {"answer": "no", "keywords": ["x-ray"]}, 1.0),
    (c("The heart is enlarged, an enlarged heart.", "yes"), {"answer": "yes", "keywords": ["cardiomegaly"]}, 1.0),
    (c("Massive bleeding.", "no"), {"answer": "no", "keywords": ["mass"]}, 0.0),  # "mass" in "massive"
    (c("Two masses.", "yes"), {"answer": "yes", "keywords": ["mass"]}, 1.0),
    (c("Several opacities.", "yes"), {"answer": "yes", "keywords": ["opacity"]}, 1.0),
    (c("An effusion.", "yes"), {"answer": "yes", "keywords": ["effusion", "Effusions"]}, 1.0),  # same keyword twice
    (c("A pneumothorax on the chest X-ray.", "no"), {"answer": "no", "keywords": "pneumothorax/chest X-ray/no"}, 2 / 3),
    (c(POSITIVE, "yes"), {"answer": "yes", "keywords": []}, 0.0),
    (c(POSITIVE, "yes"), {"answer": "yes"}, 0.0),
    (c("meniscus pleural effusion costophrenic angle", "yes"), EFFUSION, 1.0),  # a bare list: not resisted, capped
]


@pytest.mark.parametrize("completion,example,expected", FACT)
def test_fact_table(completion, example, expected):
    assert fact_reward(completion, example) == pytest.approx(expected)

# -----------------------------------------------------------------------------
# consistency

LOWER = UPPER.replace("So, the nodule is in the upper zone.", "So, the nodule is in the lower zone.")
MULTILINE = "Pleural effusion is fluid in the pleural space.\nThe angle is blunted.\nSo, an effusion is present"
CONSISTENCY = [
    (c(POSITIVE, "yes"), YES, 1.0),
    (c(NEGATIVE, "no"), NO, 1.0),
    (c(NEGATIVE, "yes"), YES, 0.0),                                  # reasoning contradicts the answer
    (c(POSITIVE, "no"), NO, 0.0),
    (c("The angles are sharp. So, the lungs are clear without effusion.", "no"), NO, 1.0),
    (c("So, a pleural effusion is absent.", "no"), NO, 1.0),
    (c("So, there is no evidence of pleural effusion.", "No."), NO, 1.0),
    (c("So, there isn't an effusion.", "no"), NO, 1.0),
    (c("So, an effusion can be ruled out.", "no"), NO, 1.0),
    (c(MULTILINE, "yes"), YES, 1.0),                                 # multi-line, no final full stop
    (c("There is no effusion. Wait, the meniscus is clear.\nSo, an effusion is present!", "yes"), YES, 1.0),
    (c("An effusion is present. So, there is no effusion.", "yes"), YES, 0.0),  # only the last sentence
    (c(POSITIVE, "yes or no"), YES, 0.0),                            # hedged answer
    (c(UPPER, "upper zone"), OPEN, 1.0),
    (c(LOWER, "upper zone"), OPEN, 0.5),                             # "zone" agrees, "upper" does not
    (c("So, the answer is left.", "left"), {"answer": "left", "answer_type": "open"}, 1.0),
    (c("So, there are three nodules.", "3"), TWO, 1.0),              # number word, open
    (c("So, there are several nodules.", "nodule"), {"answer": "nodule", "answer_type": "open"}, 1.0),  # plural
    (c("So, it is the liver.", "liver"), CHOICE, 1.0),               # closed, not yes/no: content words
    ("<answer>yes</answer>", YES, 0.0),                              # no reasoning
    (c("   ", "yes"), YES, 0.0),
    (c(POSITIVE, ""), YES, 0.0),
    ("", YES, 0.0),
]


@pytest.mark.parametrize("completion,example,expected", CONSISTENCY)
def test_consistency_table(completion, example, expected):
    assert consistency_reward(completion, example) == expected

# -----------------------------------------------------------------------------
# parsing, normalisation, recall


@pytest.mark.parametrize("text,expected", [
    ("The Left  Lung.", "left lung"),
    ("X-ray", "x ray"),
    ("Two", "2"),
    ("twenty-one", "20 1"),
    (7, "7"),
    (None, ""),
    ("\uff39\uff25\uff33", "yes"),
    ("  an\tApple_Pie!? ", "apple pie"),
    ("right/left", "right left"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_parsers():
    assert parse_answer(c("a", " yes ")) == "yes"
    assert parse_answer("no tags") is None
    assert parse_answer("<answer>yes") is None
    assert extract_think(c(" a\nb ", "yes")) == "a\nb"
    assert extract_think("<answer>yes</answer>") is None
    assert parse_answer_lenient(c("a", "yes")) == "yes"
    assert parse_answer_lenient("<think>a</think><answer>yes") == "yes"       # truncated answer
    assert parse_answer_lenient("<think>a</think> The answer is yes.") == "The answer is yes."
    assert parse_answer_lenient("<think>a</think>") == ""                     # stopped after thinking
    assert parse_answer_lenient("Yes, it is.") == "Yes, it is."              # no tags at all
    assert parse_answer_lenient(42) == "42"


@pytest.mark.parametrize("pred,gold,expected", [
    ("left lung", "Left lung", 1.0),
    ("the left", "left lung", 0.5),
    ("left left left", "left lung", 0.5),       # repetition cannot raise it
    ("lungs", "lung", 0.0),
    ("anything", "", 0.0),
    ("two", 2, 1.0),
])
def test_open_recall(pred, gold, expected):
    assert open_recall(pred, gold) == expected

# -----------------------------------------------------------------------------
# score and weights


def test_score_weights():
    full = score(c(NEGATIVE, "yes"), YES)   # NEGATIVE never mentions the meniscus: fact 2/3
    assert full == {"accuracy": 1.0, "format": 1.0, "fact": 2 / 3, "consistency": 0.0, "total": 2 + 2 / 3}
    half = score(c(NEGATIVE, "yes"), YES, {"accuracy": 0.5, "fact": 0.0})
    assert half["fact"] == 2 / 3 and half["total"] == 0.5 + 1.0             # off, but still reported
    with pytest.raises(ValueError):
        score(c(NEGATIVE, "yes"), YES, {"consistent": 1.0})                   # a typo is an error
    with pytest.raises(TypeError):                                            # not a str: an error
        score(None, YES)


def test_judge_not_called_when_switched_off_or_nothing_to_judge():
    calls = []
    judge = lambda prompt: calls.append(prompt) or "Yes"  # noqa: E731
    score(c(NEGATIVE, "yes"), YES, {"consistency": 0.0}, judge=judge)
    score("<answer>yes</answer>", YES, judge=judge)
    assert calls == []

# -----------------------------------------------------------------------------
# judge


def test_judge_decides_and_failures_fall_back():
    contradicting, consistent = c(NEGATIVE, "yes"), c(POSITIVE, "yes")
    assert consistency_reward(contradicting, YES, judge=lambda p: "Yes") == 1.0
    assert consistency_reward(consistent, YES, judge=lambda p: "No.") == 0.0
    assert consistency_reward(contradicting, YES, judge=lambda p: "**Yes**, it does.") == 1.0

    def times_out(prompt):
        raise TimeoutError("judge timed out")
    for judge in (times_out, lambda p: None, lambda p: "Maybe", lambda p: ""):
        assert consistency_reward(consistent, YES, judge=judge) == 1.0      # the plain check's verdict
        assert consistency_reward(contradicting, YES, judge=judge) == 0.0
    seen = []
    consistency_reward(consistent, YES, judge=lambda p: seen.append(p) or "yes")
    assert "So, a pleural effusion is present." in seen[0] and "Answer: yes" in seen[0]


class _Server:
    """A local OpenAI-compatible endpoint: replies "Yes", or stalls past the client's timeout."""

    def __init__(self, stall=0.0):
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, self.headers.get("Authorization"), body))
                if stall:
                    threading.Event().wait(stall)
                data = json.dumps({"choices": [{"message": {"content": "Yes."}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_openai_judge_talks_to_an_endpoint(monkeypatch):
    monkeypatch.setenv("MEDFACT_TEST_KEY", "sk-test-secret")
    server = _Server()
    try:
        judge = make_openai_judge(server.url, "judge-model", api_key_env="MEDFACT_TEST_KEY", timeout=5)
        assert consistency_reward(c(NEGATIVE, "yes"), YES, judge=judge) == 1.0  # the judge said Yes
        path, auth, body = server.requests[0]
        assert path == "/v1/chat/completions" and auth == "Bearer sk-test-secret"
        assert body["model"] == "judge-model" and "Reasoning:" in body["messages"][-1]["content"]
    finally:
        server.close()


def test_openai_judge_that_times_out_falls_back(monkeypatch):
    monkeypatch.setenv("MEDFACT_TEST_KEY", "sk-test-secret")
    server = _Server(stall=2.0)
    try:
        judge = make_openai_judge(server.url, "m", api_key_env="MEDFACT_TEST_KEY", timeout=0.1, retries=1)
        with pytest.raises(RuntimeError) as error:
            judge("prompt")
        assert "sk-test-secret" not in str(error.value) and "2 times" in str(error.value)
        assert len(server.requests) == 2                                     # 1 + retries attempts
        # in training the failure becomes the plain check's verdict, never an exception
        judge = make_openai_judge(server.url, "m", api_key_env="MEDFACT_TEST_KEY", timeout=0.1, retries=0)
        assert score(c(NEGATIVE, "yes"), YES, judge=judge)["consistency"] == 0.0
    finally:
        server.close()

# -----------------------------------------------------------------------------
# upstream=True: the released code's rewards, quirks included


def test_upstream_accuracy_quirks():
    up = lambda comp, ex: accuracy_reward(comp, ex, upstream=True)  # noqa: E731
    wrong_but_has_no = c("A nodule in a normal lung.", "yes")
    assert up(wrong_but_has_no, NO) == 1.0 and accuracy_reward(wrong_but_has_no, NO) == 0.0
    assert up(c("It cannot be seen.", "maybe"), NO) == 1.0            # "no" in "cannot"
    assert up(c("The eyes are fine.", "no"), YES) == 1.0              # "yes" in "eyes"
    assert up(c("hm", "yes or no"), YES) == 1.0                       # hedging pays
    assert up(c("hm", "no"), YES) == 0.0
    assert up(c("hm", "yes"), {"answer": " yes "}) == 1.0             # the exact-match fallback, stripped
    assert up(c("hm", "left"), {"answer": ""}) == 1.0                 # "" is in everything


def test_upstream_format_quirks():
    up = lambda comp: format_reward(comp, upstream=True)  # noqa: E731
    assert up("<think></think><answer></answer>") == 1.0              # empty blocks pass
    assert up(c("a", "yes") + "<answer>no</answer>") == 1.0           # extra blocks hide in .*?
    assert up(c("line\nline", "yes")) == 1.0                          # this regex has DOTALL
    assert up(" " + c("a", "yes")) == 0.0                             # fullmatch: no leading space
    assert up(c("a", "yes") + "\n") == 0.0
    assert up("<think>a</think> x <answer>yes</answer>") == 0.0


def test_upstream_fact_is_uncapped_substring_count():
    up = lambda comp, ex: fact_reward(comp, ex, upstream=True)  # noqa: E731
    six = {"keywords": ["a", "b", "c", "d", "e", "f"]}
    assert up("abcdef", six) == pytest.approx(1.2)                    # over 1: uncapped
    assert up(c("Massive bleed.", "no"), {"keywords": ["mass"]}) == pytest.approx(0.2)
    assert up("effusion " * 9, {"keywords": "effusion/angle"}) == pytest.approx(0.2)
    assert up("", {"keywords": []}) == pytest.approx(0.2)             # "" is in every string


def test_upstream_consistency_quirks():
    up = lambda comp, judge=None, ex=YES: consistency_reward(comp, ex, upstream=True, judge=judge)  # noqa: E731
    assert up(c(MULTILINE, "yes"), judge=lambda p: "Yes") == 0.0      # no DOTALL: never judged
    assert up(c(POSITIVE, "yes")) == 1.2                              # no judge: the plain check says Yes
    assert up(c(NEGATIVE, "yes")) == -0.2                             # ... or No
    assert up(c(NEGATIVE, "yes"), judge=lambda p: "Yes, it can.") == 1.2
    assert up(c(POSITIVE, "yes"), judge=lambda p: "No") == -0.2
    assert up(c(POSITIVE, "yes"), judge=lambda p: "Not sure") == -0.2  # "no" in "not sure"
    assert up(c(POSITIVE, "yes"), judge=lambda p: "Hmm.") == 0.2
    assert up(c(POSITIVE, "yes"), judge=lambda p: 1 / 0) == 1.2       # upstream crashes; we fall back
    prompts = []
    up(c(" a ", " yes "), judge=lambda p: prompts.append(p) or "Yes")
    assert prompts[0] == rewards.UPSTREAM_JUDGE_PROMPT.format("<think>a</think>", "<answer>yes</answer>")
    assert prompts[0].startswith("I will provide you with a reasoning process")


def test_upstream_score_sums_the_released_rewards():
    s = score(c(POSITIVE, "yes"), YES, upstream=True)
    assert s == {"accuracy": 1.0, "format": 1.0, "fact": pytest.approx(0.6), "consistency": 1.2,
                 "total": pytest.approx(3.8)}


def test_upstream_linear_rewrites_match_the_released_regexes():
    # the released regexes are quadratic on tag soup, so upstream mode computes them without
    # regex backtracking; here they must agree with re on random tag strings
    rng = random.Random(0)
    parts = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "\t", "a", "no", "<", ">", "/", "\u2028"]
    for _ in range(5000):
        s = "".join(rng.choice(parts) for _ in range(rng.randint(0, 10)))
        expected = 1.0 if re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", s, re.DOTALL) else 0.0
        assert format_reward(s, upstream=True) == expected, repr(s)
        for tag in ("answer", "think"):
            m = re.search(f"<{tag}>(.*?)</{tag}>", s)
            assert rewards._first_line_block(s, f"<{tag}>", f"</{tag}>") == (m.group(1) if m else None), repr(s)

# -----------------------------------------------------------------------------
# safety: huge and hostile inputs, ranges, standard library only

HUGE = {
    "words": "<think>" + "the pleural space is clear " * 40_000 + "So, no.</think><answer>no</answer>",
    "tag soup": "<think><answer></think></answer>" * 30_000,
    "unclosed": "<answer>" * 120_000,          # quadratic for the released answer regex
    "one token": "<think>" + "a" * 1_000_000 + "</think><answer>" + "b" * 1_000_000 + "</answer>",
}


@pytest.mark.parametrize("name", HUGE)
def test_huge_inputs_are_scored(name):
    # no timing here (bench/rewards_speed.py measures it); a quadratic path would hang this test
    for upstream in (False, True):
        s = score(HUGE[name], NO, upstream=upstream)
        assert set(s) == {"accuracy", "format", "fact", "consistency", "total"}
    assert score(HUGE["words"], NO) == {"accuracy": 1.0, "format": 1.0, "fact": 0.0, "consistency": 1.0, "total": 3.0}


def test_fuzz_rewards_stay_in_their_ranges():
    rng = random.Random(1234)
    parts = ["<think>", "</think>", "<answer>", "</answer>", "yes", "no", "not", "So,", ". ", "\n", " ",
             "pleural effusion", "effusions", "upper zone", "left", "maybe", "or", "\u00e9", "\uff59",
             "\u200b", "<", ">", "/", "\u3002", "n't", "3", "three"]
    examples = [YES, NO, OPEN, LEFT, TWO, CT, CHOICE, UNTYPED, {}, {"answer": "", "keywords": "a//b"}]
    for _ in range(2000):
        completion = "".join(rng.choice(parts) for _ in range(rng.randint(0, 30)))
        example = rng.choice(examples)
        s = score(completion, example)
        assert all(0.0 <= s[k] <= 1.0 for k in rewards.REWARDS), (completion, s)
        assert s["total"] == pytest.approx(sum(s[k] for k in rewards.REWARDS))
        u = score(completion, example, upstream=True)
        assert u["accuracy"] in (0.0, 1.0) and u["format"] in (0.0, 1.0)
        assert u["consistency"] in (-0.2, 0.0, 0.2, 1.2)
        n_keywords = len("/".join(map(str, example.get("keywords") or [])).split("/")) \
            if not isinstance(example.get("keywords"), str) else len(example["keywords"].split("/"))
        assert 0.0 <= u["fact"] <= 0.2 * n_keywords + 1e-9
        assert math.isclose(u["fact"] / 0.2, round(u["fact"] / 0.2), abs_tol=1e-9)


def test_standard_library_only_and_works_copied_alone(tmp_path):
    tree = ast.parse((ROOT / "rewards.py").read_text())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert modules and modules <= set(sys.stdlib_module_names), modules
    shutil.copy(ROOT / "rewards.py", tmp_path / "rewards.py")
    code = ("import rewards; c = '<think>So, yes.</think><answer>yes</answer>'; "
            "print(rewards.score(c, {'answer': 'yes', 'answer_type': 'closed', 'keywords': []})['total'], "
            "rewards.trl_total(['q'], [[{'role': 'assistant', 'content': c}]], answer=['yes'])[0], "
            "rewards.compute_score(data_source='d', solution_str=c, ground_truth='yes')['score'])")
    # -S: no site-packages, so only the standard library and the copied file are importable
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3.0", "3.0", "3.0"]  # score, the TRL and the verl adapter


def test_reward_tests_need_only_pytest():
    # what conftest.py collects where only pytest is installed: these files' top-level imports
    # (imports inside a test are guarded with pytest.importorskip)
    for name in ("conftest.py", "test_rewards.py", "test_adapters.py"):
        tree = ast.parse((ROOT / "tests" / name).read_text())
        top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
        assert top <= set(sys.stdlib_module_names) | {"pytest", "rewards"}, (name, top)


def test_exact_match_is_evaluations_lenient_normalised_answer():
    assert rewards.exact_match("<think>x</think><answer>The Liver.</answer>", "liver")
    assert rewards.exact_match("<think>x</think> two", "2")  # no answer tags: the text after </think>
    assert not rewards.exact_match("<think>the liver</think><answer>spleen</answer>", "liver")
    assert not rewards.exact_match("<think>x</think>", "liver")  # stopped after thinking: no answer
