"""
rewards.py: the four MEDFACT-R1 rewards (accuracy, format, fact, consistency), hardened
against reward hacking. Standard library only: copy this one file into any project.

    from rewards import score
    example = {"answer": "yes", "answer_type": "closed", "keywords": ["pleural effusion"]}
    completion = "<think>... So, a pleural effusion is present.</think><answer>yes</answer>"
    score(completion, example)   # {'accuracy': 1.0, 'format': 1.0, 'fact': 1.0, 'consistency': 1.0, 'total': 4.0}

A completion is `<think> reasoning </think><answer> answer </answer>`. `example` carries
`answer`, `answer_type` ("closed" = yes/no, or "open") and `keywords` (list of str).
`total` is the weighted sum of the four rewards (weight 1.0 each by default, as in the paper).
In TRL, `GRPOTrainer(reward_funcs=[trl_accuracy, trl_format, trl_fact, trl_consistency], ...)`;
in verl, `custom_reward_function.path=rewards.py` (compute_score). See the last section.

Where we depart from the released MEDFACT-R1 code (Garfieldgengliang/MEDFACT-R1,
r1-v/src/open_r1/grpo_lgl.py @ 73775d1), and why:
- accuracy: upstream counts the ground truth as a substring of the whole output, so the
  answer "no" is found in "nodule", "normal", "cannot"; we grade only the answer block,
  after normalize_answer (also what evaluate.py uses), and refuse hedged yes/no answers.
- format: upstream accepts empty blocks and extra blocks hidden inside the lazy `.*?`;
  we want exactly one non-empty think block then exactly one non-empty answer block.
- fact: upstream adds 0.2 per keyword found as a substring anywhere, uncapped (five
  keywords = a reward of 1.0, ten = 2.0); we score the share of keywords that the
  reasoning mentions as whole words, in [0, 1].
- consistency: upstream asks qwen2.5-72b-instruct behind an API, and its think regex
  lacks DOTALL, so multi-line reasoning never reaches the judge and always scores 0.
  Our default is a plain-Python check (the conclusion's polarity or content vs the
  answer); a judge is optional, and a judge failure falls back to the plain check.
- `upstream=True` restores the released rewards, quirks included (see the last section);
  with no judge given, the plain check stands in for the 72B judge, on upstream's scale.

The text rules are written once, here: words (WORD_RE), singular, NEGATIONS and
is_negated, normalize_answer, is_yes_no_question. retrieve.py imports them, so the
pseudo-labels it writes are read by these rewards as it meant them (tests/test_retrieve.py
states that contract), and uses make_openai_chat, the one OpenAI-compatible client.

Every reward runs in time linear in the completion, with no backtracking-prone regex,
and caps the text it reads (MAX_* below), so a megabyte of tag soup costs milliseconds.
Speed: `python bench/rewards_speed.py`. Tests: `python -m pytest -q tests/test_rewards.py`.
"""

import json
import os
import re
import time
import unicodedata
import urllib.request
from functools import lru_cache

REWARDS = ("accuracy", "format", "fact", "consistency")

# No real answer is longer than this; longer answer blocks score 0 (and cost nothing).
MAX_ANSWER_CHARS = 1000
# fact reads the first 20,000 characters of the reasoning (~3,000 words: far beyond a
# 1,024-token completion), the judge sees the same; consistency reads the conclusion's
# last 1,000 characters. These bound the work on runaway or adversarial completions.
MAX_REASONING_CHARS = 20_000
MAX_CONCLUSION_CHARS = 1000

# -----------------------------------------------------------------------------
# parsing: the think and answer blocks

def _last_block(text, open_tag, close_tag):
    # the last opening tag and the first closing tag after it; str.rfind/find, no regex
    start = text.rfind(open_tag)
    if start < 0:
        return None
    end = text.find(close_tag, start + len(open_tag))
    if end < 0:
        return None
    return text[start + len(open_tag):end].strip()


def parse_answer(completion):
    """The text of the answer block, stripped; None when there is none.

    With several blocks, the LAST `<answer>` and the first `</answer>` after it: the
    model's final word. An unclosed last `<answer>` (a truncated completion) gives None:
    the model did not finish answering. Tags are case-sensitive, as the prompt shows them.
    """
    return _last_block(completion, "<answer>", "</answer>")


def extract_think(completion):
    """The text of the think block (same rule as parse_answer: the last one), or None."""
    return _last_block(completion, "<think>", "</think>")


_TAGS = ("<think>", "</think>", "<answer>", "</answer>")

def parse_answer_lenient(completion):
    """The answer for evaluation, where a missing tag should not zero a correct answer.

    In order: the answer block (parse_answer); else the text after the last `<answer>`
    (a truncated block); else the text after the last `</think>` (possibly empty: a model
    that stopped after thinking gave no answer); else the whole completion. Tags are
    removed from the fallbacks.
    """
    text = completion if isinstance(completion, str) else str(completion)
    answer = parse_answer(text)
    if answer is not None:
        return answer
    for tag in ("<answer>", "</think>"):
        i = text.rfind(tag)
        if i >= 0:
            text = text[i + len(tag):]
            break
    for tag in _TAGS:
        text = text.replace(tag, " ")
    return text.strip()

# -----------------------------------------------------------------------------
# answer normalisation (shared with data.py and evaluate.py)

_PUNCT = re.compile(r"[^\w\s]|_")  # one character class: linear, cannot backtrack
_ARTICLES = frozenset(("a", "an", "the"))
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split())}


def normalize_answer(text):
    """THE answer normalisation of medfact: rewards, data and evaluation all use it.

    NFKC unicode (full-width letters become ASCII), lowercase, every punctuation or symbol
    character (anything not a letter, digit or space, and "_") becomes a space, the
    articles a/an/the are dropped, number words zero..twenty become digits, whitespace is
    collapsed. So "The Left  Lung." -> "left lung", "X-ray" -> "x ray", "Two" -> "2".
    Non-str input goes through str() (VQA-RAD has integer answers); None gives "".
    Known losses: "vitamin A" -> "vitamin", "2.5 cm" -> "2 5 cm" (on both sides alike).
    """
    if text is None:
        return ""
    s = text if isinstance(text, str) else str(text)
    if not s.isascii():
        s = unicodedata.normalize("NFKC", s)
    s = _PUNCT.sub(" ", s.lower())
    return " ".join([_NUMBER_WORDS.get(w, w) for w in s.split() if w not in _ARTICLES])


_normalize_cached = lru_cache(maxsize=1 << 16)(normalize_answer)  # gold answers repeat G times


def open_recall(pred, gold):
    """Share of the normalised gold answer's distinct words found in the normalised
    prediction (LLaVA-Med's open-question recall). Over distinct words, so repeating a
    word cannot raise it. An empty gold gives 0."""
    gold_words = set(normalize_answer(gold).split())
    if not gold_words:
        return 0.0
    return len(gold_words & set(normalize_answer(pred).split())) / len(gold_words)


def exact_match(completion, gold):
    """Evaluation's accuracy: the lenient answer (parse_answer_lenient) equals the gold one, normalised."""
    return normalize_answer(parse_answer_lenient(completion)) == normalize_answer(gold)

# -----------------------------------------------------------------------------
# accuracy

# Words that turn a yes/no into a guess: "yes, possibly", "likely no", "yes or no".
_HEDGES = frozenset("maybe possibly possible probably probable perhaps likely unlikely "
                    "uncertain unsure unclear might may could or either".split())


def _polarity(tokens):
    # "yes" / "no" when the words say exactly one of them and do not hedge, else None
    has_yes, has_no = "yes" in tokens, "no" in tokens
    if has_yes == has_no or not _HEDGES.isdisjoint(tokens):
        return None
    return "yes" if has_yes else "no"


def is_yes_no_question(example, gold=None):
    """Is the example graded as yes/no? Its normalised gold answer (`gold`, computed when
    None) is yes or no and its answer_type (any case) is closed, or absent or unknown."""
    if gold is None:
        gold = _normalize_cached(str(example.get("answer", "")))
    kind = str(example.get("answer_type") or "").strip().lower()
    if kind in ("closed", "open"):
        return kind == "closed" and gold in ("yes", "no")
    return gold in ("yes", "no")


def accuracy_reward(completion, example, *, upstream=False):
    """Is the answer in the answer block right? In [0, 1].

    Only the answer block is graded (parse_answer), after normalize_answer.
    - yes/no questions: 1 when the answer says exactly one of yes/no, agrees with the gold,
      and does not hedge ("yes", "Yes.", "no, there is no effusion"). "yes or no",
      "possibly yes, maybe no", "yes, likely" get 0.
    - other questions: exact normalised match scores 1. Partial credit only for a strict
      sub-answer: every answer word is a gold word, and the score is the share of the gold
      words given ("lung" for "left lung": 0.5). Words are whole tokens, so a word inside
      another word never counts, and listing candidates ("left right") always adds a
      wrong word and scores 0. The same words in another order score 1.
    A closed question whose gold is not yes/no (e.g. "liver or kidney?") needs an exact match.
    Resists: substring traps ("no" in "nodule"), answers hidden in the reasoning, hedging,
    listing, answers over MAX_ANSWER_CHARS. Does not resist: a lucky guess on a yes/no
    question; plural/synonym variants score 0 ("nodules" for "nodule"), as in evaluation.
    """
    if upstream:
        return _upstream_accuracy(completion, example)
    answer = parse_answer(completion)
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return 0.0
    pred, gold = normalize_answer(answer), _normalize_cached(str(example.get("answer", "")))
    if not pred or not gold:
        return 0.0
    if is_yes_no_question(example, gold):
        return 1.0 if _polarity(pred.split()) == gold else 0.0
    if pred == gold:
        return 1.0
    kind = str(example.get("answer_type") or "").strip().lower()
    if kind == "closed":
        return 0.0  # a choice between named options: no partial credit
    pred_words, gold_words = set(pred.split()), set(gold.split())
    return len(pred_words) / len(gold_words) if pred_words <= gold_words else 0.0

# -----------------------------------------------------------------------------
# format

def format_reward(completion, *, upstream=False):
    """1 when the completion is exactly `<think>R</think><answer>A</answer>` with R and A
    non-empty, and only whitespace around and between the blocks; else 0.

    Multi-line reasoning is fine. Resists: empty blocks, repeated or nested blocks, text
    after the answer, a missing block. Does not resist: a content-free but non-empty
    think block ("<think>.</think>"); the other rewards have to make reasoning pay.
    """
    if upstream:
        return _upstream_format(completion)
    s = completion.strip()
    if not (s.startswith("<think>") and s.endswith("</answer>")):
        return 0.0
    if any(s.count(tag) != 1 for tag in _TAGS):
        return 0.0
    think_end, answer_start = s.find("</think>"), s.find("<answer>")
    if think_end > answer_start:
        return 0.0
    think, between, answer = s[7:think_end], s[think_end + 8:answer_start], s[answer_start + 8:-9]
    return 1.0 if think.strip() and answer.strip() and not between.strip() else 0.0

# -----------------------------------------------------------------------------
# fact

WORD_RE = re.compile(r"[^\W_]+")  # a word: a run of letters/digits in any script (retrieve.py's too)

# Phrases that name the same thing. Edit this table in your copy to add your own.
SYNONYMS = (
    ("x ray", "xray", "radiograph", "radiography"),
    ("ct", "computed tomography"),
    ("mri", "magnetic resonance imaging"),
    ("cardiomegaly", "enlarged heart", "cardiac enlargement", "heart enlargement"),
    ("edema", "oedema"), ("hemorrhage", "haemorrhage"), ("tumor", "tumour"),
    ("esophagus", "oesophagus"), ("anemia", "anaemia"), ("hematoma", "haematoma"),
    ("ischemia", "ischaemia"),
)


def words(text):
    """NFKC + lowercase + runs of letters/digits: the words fact and consistency compare (and retrieve.py
    writes with). "The Left-Lung's T2" -> ["the", "left", "lung", "s", "t2"]."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return WORD_RE.findall(text.lower())


def singular(word):
    """The simple English singular of a lowercase word: effusions -> effusion, opacities ->
    opacity, masses -> mass, boxes -> box; words of 3 letters or fewer, digits and the
    endings "ss", "us", "is" are kept (sinus, pelvis). Irregular plurals (bronchi,
    metastases) are not handled. THE plural rule: retrieve.py stems with it too."""
    if len(word) <= 3 or word.isdigit():
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


@lru_cache(maxsize=1 << 16)
def _word_forms(word):
    """A word with its singular and plural: effusions -> effusion, effusions; opacity ->
    opacities; mass -> masses; box -> boxes. Short words (no, ct) are left alone."""
    if len(word) < 3 or word.isdigit():
        return (word,)
    one = singular(word)
    if one.endswith("y") and one[-2:-1] not in ("a", "e", "i", "o", "u"):
        plural = one[:-1] + "ies"
    elif one.endswith(("s", "x", "z", "ch", "sh")):
        plural = one + "es"
    else:
        plural = one + "s"
    return tuple(dict.fromkeys((word, one, plural)))


def _keyword_list(example):
    keywords = example.get("keywords") or ()
    if isinstance(keywords, str):  # the released data joins keywords with "/"
        keywords = keywords.split("/")
    return tuple(str(k) for k in keywords)


@lru_cache(maxsize=1 << 12)
def _keyword_forms(keywords):
    """keywords -> one tuple of " padded phrase " forms per distinct keyword. A keyword's
    forms: its synonyms (SYNONYMS), each with the singular/plural of its last word (the
    head noun: "pleural effusions"). Keywords with the same forms count once."""
    distinct = {}
    for keyword in keywords:
        phrase = " ".join(words(keyword))
        if not phrase:
            continue
        variants = {phrase}
        for group in SYNONYMS:
            for variant in list(variants):
                padded = f" {variant} "
                for member in group:
                    if f" {member} " in padded:
                        variants.update(padded.replace(f" {member} ", f" {other} ").strip() for other in group)
                        break
        forms = set()
        for variant in variants:
            head, _, last = variant.rpartition(" ")
            forms.update(f" {head} {form} " if head else f" {form} " for form in _word_forms(last))
        distinct.setdefault(frozenset(forms), tuple(sorted(forms)))
    return tuple(distinct.values())


def fact_reward(completion, example, *, upstream=False):
    """Share of the example's keywords that the reasoning mentions, in [0, 1].

    The reasoning is the think block (its first MAX_REASONING_CHARS characters). A keyword
    counts when it appears as whole words, case-insensitively, allowing the singular or
    plural of its last word and the synonyms in SYNONYMS ("X-ray" = "radiograph").
    No keywords or no think block: 0.
    Resists: repetition (mentioned once or a hundred times, a keyword counts once),
    keyword dumps outside the think block, substrings ("mass" is not in "massive").
    Does not resist: a think block that lists the keywords without using them; it cannot
    tell a mention from an argument ("no effusion" mentions "effusion").
    """
    if upstream:
        return _upstream_fact(completion, example)
    keyword_forms = _keyword_forms(_keyword_list(example))
    if not keyword_forms:
        return 0.0
    think = extract_think(completion)
    if not think:
        return 0.0
    text = " " + " ".join(words(think[:MAX_REASONING_CHARS])) + " "
    found = sum(1 for forms in keyword_forms if any(form in text for form in forms))
    return found / len(keyword_forms)

# -----------------------------------------------------------------------------
# consistency

# What makes a sentence negative (is_negated). retrieve.py writes its conclusions by these lists too.
NEGATIONS = frozenset("no not without absent absence none neither nor never cannot "
                      "nothing negative".split())
_NEGATION_PHRASES = (" free of ", " ruled out ", " rules out ", " rule out ")
_SENTENCE_ENDS = (". ", ".\n", "! ", "!\n", "? ", "?\n", "\n", "\u3002")
_STOPWORDS = frozenset("of in on at to is are was were be been and or with for by from "
                       "this that it its there as which".split())


def conclusion_of(think):
    """The conclusion of a reasoning: its last sentence (after the last ". ", "! ", "? " or
    line break, ignoring the final full stop), at most its last MAX_CONCLUSION_CHARS."""
    tail = think.rstrip().rstrip(".!?\u3002").rstrip()[-MAX_CONCLUSION_CHARS:]
    cut = max(tail.rfind(end) for end in _SENTENCE_ENDS)
    return tail[cut + 1:].strip()


def is_negated(sentence):
    """Does the sentence contain a negation (NEGATIONS, n't, _NEGATION_PHRASES)? Double negation
    ("not absent") reads as negative."""
    low = sentence.lower()
    if "n't" in low or "n\u2019t" in low:
        return True
    tokens = words(low)
    if not NEGATIONS.isdisjoint(tokens):
        return True
    padded = " " + " ".join(tokens) + " "
    return any(phrase in padded for phrase in _NEGATION_PHRASES)


def _plain_consistency(think, answer, example):
    conclusion = conclusion_of(think)
    if not conclusion or len(answer) > MAX_ANSWER_CHARS:
        return 0.0
    gold = _normalize_cached(str(example.get("answer", "")))
    answer_words = normalize_answer(answer).split()
    if is_yes_no_question(example, gold):
        polarity = _polarity(answer_words)
        if polarity is None:
            return 0.0
        return 1.0 if ("no" if is_negated(conclusion) else "yes") == polarity else 0.0
    # open: the answer's content words (with singular/plural) among the conclusion's words
    content = list(dict.fromkeys(w for w in answer_words if w not in _STOPWORDS)) or answer_words
    if not content:
        return 0.0
    said = set(normalize_answer(conclusion).split())
    return sum(1 for w in content if any(f in said for f in _word_forms(w))) / len(content)


JUDGE_PROMPT = (
    "You check medical reasoning. Below are a model's reasoning and its final answer to a "
    "question about a medical image.\n"
    "Question: {question}\nReasoning: {think}\nAnswer: {answer}\n"
    "Does the reasoning support the answer without contradicting it? "
    "Reply with one word, Yes or No.")


def _ask_judge(judge, prompt):
    # 1.0 / 0.0 from the judge's first word; None on any failure (the caller falls back)
    try:
        reply = judge(prompt)
    except Exception:
        return None
    if not isinstance(reply, str):
        return None
    first = WORD_RE.search(reply[:100].lower())
    if first is None or first.group() not in ("yes", "no"):
        return None
    return 1.0 if first.group() == "yes" else 0.0


def consistency_reward(completion, example, *, upstream=False, judge=None):
    """Does the reasoning's conclusion agree with the answer? In [0, 1].

    The conclusion is the last sentence of the think block (conclusion_of).
    - yes/no questions: its polarity must match the answer's. It is negative when it
      contains a negation: no, not, n't, without, absent, absence, none, neither, nor,
      never, cannot, nothing, negative, free of, rule(d/s) out ("no evidence of" via
      "no"); otherwise positive. "So, there is no pleural effusion." + "no": 1; + "yes": 0.
      A hedged answer scores 0.
    - open questions: the share of the answer's content words (stopwords dropped,
      singular/plural allowed) that the conclusion contains. "So, the nodule is in the
      upper zone." + "upper zone": 1.
    No think or answer block: 0.
    judge: any callable prompt -> str (e.g. make_openai_judge). Its reply's first word
    decides (yes 1, no 0); an exception, a timeout or any other reply falls back to the
    plain check, so a judge can never stop training.
    Resists: a correct answer under reasoning that concludes the opposite, conclusions
    hidden mid-reasoning (only the last sentence counts), multi-line reasoning (no regex).
    Does not resist: a conclusion that restates the answer without support
    ("So, the answer is yes."); double negation; negation in open conclusions
    ("not the left lung" still contains "left lung"); prompt injection aimed at the judge.
    """
    if upstream:
        return _upstream_consistency(completion, example, judge)
    think, answer = extract_think(completion), parse_answer(completion)
    if not think or not answer or len(answer) > MAX_ANSWER_CHARS:
        return 0.0  # (checked here too, so an over-long answer is never sent to the judge)
    if judge is not None:
        prompt = JUDGE_PROMPT.format(question=example.get("question", ""),
                                     think=think[:MAX_REASONING_CHARS], answer=answer)
        verdict = _ask_judge(judge, prompt)
        if verdict is not None:
            return verdict
    return _plain_consistency(think, answer, example)


def make_openai_chat(base_url, model, api_key_env="OPENAI_API_KEY", timeout=30, retries=2, system=None,
                     **params):
    """A client for any OpenAI-compatible chat endpoint (OpenAI, vLLM, DashScope, llama.cpp,
    ...), with urllib only: chat(prompt) -> the reply text (None when the reply has none).
    Raises after 1 + retries failed attempts (backoff 0.5 s, 1 s, ...). `system` is an
    optional system message; `params` go into the request as they are (temperature,
    max_tokens, ...). retrieve.py's openai: trace writer uses it too.

    The key is read from the environment variable api_key_env at each call (no header when
    unset, for local servers) and never logged or put in an error message. timeout is per
    socket operation, in seconds.
    """
    url = base_url.rstrip("/") + "/chat/completions"

    def chat(prompt):
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": prompt}]
        body = json.dumps({"model": model, **params, "messages": messages}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(api_key_env)
        if key:
            headers["Authorization"] = "Bearer " + key
        error = None
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    reply = json.loads(response.read().decode("utf-8"))
                return reply["choices"][0]["message"]["content"]
            except Exception as e:  # timeout, refused, HTTP error, bad JSON: retry
                error = e
        # the type and the reason only: urllib errors never carry the request headers
        raise RuntimeError(f"{url} failed {retries + 1} times: {type(error).__name__}: {str(error)[:200]}")

    return chat


def make_openai_judge(base_url, model, api_key_env="OPENAI_API_KEY", timeout=30, retries=2):
    """A consistency judge on an OpenAI-compatible endpoint: judge(prompt) -> the reply
    text (make_openai_chat); a failure raises, which consistency_reward turns into a
    fallback. Sampling follows the released code (temperature 0.2, top_p 0.8) with a
    short max_tokens, since only the first word is read.
    """
    return make_openai_chat(base_url, model, api_key_env, timeout, retries, system="You are a helpful assistant.",
                            temperature=0.2, top_p=0.8, max_tokens=16)

# -----------------------------------------------------------------------------
# upstream: the released code's four rewards, quirks included

# The released judge prompt, verbatim (its backslash line continuations kept the next
# line's indentation inside the string, hence the runs of spaces).
UPSTREAM_JUDGE_PROMPT = (
    "I will provide you with a reasoning process and a corresponding answer. You need to tell me if the "
    "reasoning process can lead to the answer. For example,         if the reasoning process said '<think> "
    "Pneumothorax is a condition where air accumulates in the pleural space, which is the area between the "
    "lungs and the chest wall.         On an X-ray, this can appear as a dark or white area in the lung "
    "field, depending on the location of the air collection. However, the image provided does not show  "
    "       any obvious signs of pneumothorax. It appears to be a normal chest X-ray without any visible "
    "abnormality that would suggest pneumothorax. Therefore,         based on the given image, pneumothorax "
    "cannot be definitively seen.</think>' and the answer said '<answer> yes, pneumothorax can be "
    "identified.</answer>', it means           the reasoning process does not match with the answer, thus "
    "you should respond 'No'. On the other hand, you should respond 'Yes'. Now here is the reasoning "
    "process{} \n here is the answer {} \n your response: ")


def _first_line_block(text, open_tag, close_tag):
    """What re.search(open_tag + "(.*?)" + close_tag, text).group(1) returns (no DOTALL:
    the block must sit on one line), or None; in linear time, where the regex itself is
    quadratic on a line of unclosed open tags."""
    n = len(open_tag)
    start, end = text.find(open_tag), -1
    while start >= 0:
        if end < start + n:  # the first closing tag after this opening tag
            end = text.find(close_tag, start + n)
            if end < 0:
                return None
        newline = text.find("\n", start + n, end)
        if newline < 0:
            return text[start + n:end]
        # every opening tag before that line break fails the same way
        start = text.find(open_tag, newline + 1)
    return None


def _upstream_accuracy(completion, example):
    # 1 if the gold is a substring of the lowercased output, anywhere (the quirk); else an
    # exact, case-sensitive comparison of the first single-line answer blocks
    solution = str(example.get("answer", ""))
    if solution.lower() in completion.lower():
        return 1.0
    gold = _first_line_block(solution, "<answer>", "</answer>")
    gold = gold.strip() if gold is not None else solution.strip()
    student = _first_line_block(completion, "<answer>", "</answer>")
    student = student.strip() if student is not None else completion.strip()
    return 1.0 if student == gold else 0.0


_UPSTREAM_FORMAT_MIDDLE = re.compile(r"</think>\s*<answer>")

def _upstream_format(completion):
    # re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", s, re.DOTALL), which is
    # quadratic on tag soup, computed as: starts with <think>, ends with </answer>, and the
    # first "</think> <answer>" after the opening tag ends before the closing one (the
    # first match has the earliest end; each literal tag fixes where \s* stops)
    if not (completion.startswith("<think>") and completion.endswith("</answer>")):
        return 0.0
    middle = _UPSTREAM_FORMAT_MIDDLE.search(completion, 7)
    return 1.0 if middle is not None and middle.end() <= len(completion) - 9 else 0.0


def _upstream_fact(completion, example):
    # +0.2 per "/"-separated keyword that is a substring of the lowercased output, uncapped;
    # an empty keyword string counts once, since "" is in every string
    keywords = example.get("keywords") or ""
    if not isinstance(keywords, str):
        keywords = "/".join(str(k) for k in keywords)
    content, reward = completion.lower(), 0.0
    for keyword in keywords.split("/"):
        if keyword.lower() in content:
            reward += 0.2  # accumulated like upstream, float rounding included
    return reward


def _upstream_consistency(completion, example, judge):
    # The first single-line think and answer blocks (no DOTALL: multi-line reasoning
    # scores 0 before any judge is asked), then the judge's reply: "yes" in its first 10
    # characters 1.2, else "no" there -0.2, else 0.2. Upstream calls qwen2.5-72b-instruct
    # and crashes on an API error. With no judge, or when the judge fails, the plain check
    # stands in for it and answers "Yes" (score >= 0.5) or "No": the scale and the
    # quirks stay upstream's, the verdict is ours.
    think = _first_line_block(completion, "<think>", "</think>")
    answer = _first_line_block(completion, "<answer>", "</answer>")
    if think is None or answer is None:
        return 0.0
    think, answer = think.strip(), answer.strip()
    reply = None
    if judge is not None:
        try:
            reply = judge(UPSTREAM_JUDGE_PROMPT.format(f"<think>{think}</think>", f"<answer>{answer}</answer>"))
        except Exception:
            reply = None
    if not isinstance(reply, str):
        reply = "Yes" if _plain_consistency(think, answer, example) >= 0.5 else "No"
    head = reply.lower()[:10]
    if "yes" in head:
        return 1.2
    if "no" in head:
        return -0.2
    return 0.2

# -----------------------------------------------------------------------------
# score

def score(completion, example, weights=None, *, upstream=False, judge=None):
    """All four rewards of one completion and their weighted sum.

    Returns {"accuracy", "format", "fact", "consistency", "total"} (floats). weights maps
    reward names to floats; a missing name weighs 1.0, an unknown name raises ValueError,
    and weight 0 switches a reward off: it is still computed and returned for logging,
    but adds nothing to total, and the judge is not called. upstream=True gives the
    released code's rewards (ranges: accuracy and format {0, 1}, fact 0.2 per keyword,
    uncapped, consistency {-0.2, 0, 0.2, 1.2}); otherwise every reward is in [0, 1].
    judge: see consistency_reward. completion must be a str: a chat completion (a list of
    messages) raises TypeError rather than scoring its repr; completion_text unwraps one.
    """
    if not isinstance(completion, str):
        raise TypeError(f"score() needs the completion as a str, got {type(completion).__name__}; "
                        "for chat messages pass completion_text(messages)")
    w = dict.fromkeys(REWARDS, 1.0)
    if weights:
        unknown = set(weights) - set(REWARDS)
        if unknown:
            raise ValueError(f"unknown reward weights {sorted(unknown)}; known: {REWARDS}")
        w.update(weights)
    scores = {
        "accuracy": accuracy_reward(completion, example, upstream=upstream),
        "format": format_reward(completion, upstream=upstream),
        "fact": fact_reward(completion, example, upstream=upstream),
        "consistency": consistency_reward(completion, example, upstream=upstream,
                                          judge=judge if w["consistency"] else None),
    }
    scores["total"] = sum(w[k] * scores[k] for k in REWARDS)
    return scores

# -----------------------------------------------------------------------------
# adapters: the rewards in TRL and in verl

def completion_text(completion):
    """The text of a completion as trainers hand it over: a str as is; a chat completion (a
    list of messages, e.g. TRL's [{"role": "assistant", "content": text}]) gives its last
    message's content, which is a str or a list of parts [{"type": "text", "text": ...}]
    (the text parts are joined). Anything else raises TypeError."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, (list, tuple)) and all(isinstance(part, dict) for part in content):
            return "".join(part.get("text") or "" for part in content if part.get("type", "text") == "text")
    raise TypeError(f"a completion is a str or a list of chat messages, got {type(completion).__name__}: "
                    f"{str(completion)[:100]}")


def _example(answer, answer_type=None, keywords=None, question=None):
    # the row score() reads; keywords may come as a tuple or an array from a parquet column
    if keywords is not None and not isinstance(keywords, str):
        keywords = [str(k) for k in keywords]
    return {"answer": answer, "answer_type": answer_type, "keywords": keywords, "question": question or ""}


class TRLReward:
    """One reward, or the total, as a TRL reward function (GRPOTrainer's reward_funcs):

        fn(prompts, completions, **columns) -> list[float], one per completion

    The dataset's columns arrive as keyword lists: `answer` (needed), `answer_type`,
    `keywords` and `question` (each optional, and may be None in a row). Completions are
    str or chat messages (completion_text). TRL logs each function as
    `rewards/<its __name__>/mean`, so the name is the part: "accuracy", ..., "total".

    Give TRL the four parts, not the total too: it sums its reward functions (weigh them with
    GRPOConfig(reward_weights=[...])) and logs the sum as `reward`, so the parts are logged
    and trained on with no double counting. A part is scored through score(), so it reads
    rows exactly as grpo.py does; the judge is only asked for "consistency" and "total".
    weights (for "total" only), upstream and judge: as in score(). A class, not a closure,
    so TRL can pickle it into a rollout worker process (as long as the judge pickles).
    """

    def __init__(self, part="total", weights=None, *, upstream=False, judge=None):
        if part != "total" and part not in REWARDS:
            raise ValueError(f"unknown reward {part!r}; known: total, {', '.join(REWARDS)}")
        if weights and part != "total":
            raise ValueError("weights apply to the total; weigh TRL's parts with GRPOConfig(reward_weights=[...])")
        self.__name__ = part  # what TRL logs the reward as
        self.part, self.weights, self.upstream = part, weights, upstream
        self.judge = judge if part in ("total", "consistency") else None

    def __call__(self, prompts, completions, **columns):
        n = len(completions)
        if columns.get("answer") is None:
            raise KeyError("the TRL reward needs an 'answer' column in the dataset (and reads answer_type, "
                           "keywords and question when present)")
        rows = {}
        for name in ("answer", "answer_type", "keywords", "question"):
            rows[name] = columns.get(name)
            if rows[name] is None:
                rows[name] = [None] * n
            elif len(rows[name]) != n:
                raise ValueError(f"{n} completions but {len(rows[name])} values in column {name!r}")
        out = []
        for i, completion in enumerate(completions):
            example = _example(*(rows[name][i] for name in ("answer", "answer_type", "keywords", "question")))
            scores = score(completion_text(completion), example, self.weights,
                           upstream=self.upstream, judge=self.judge)
            out.append(scores[self.part])
        return out

    def __repr__(self):
        return f"TRLReward({self.part!r})"


# GRPOTrainer(..., reward_funcs=[trl_accuracy, trl_format, trl_fact, trl_consistency])
trl_total = TRLReward("total")
trl_accuracy, trl_format, trl_fact, trl_consistency = (TRLReward(part) for part in REWARDS)


def compute_score(data_source, solution_str, ground_truth, extra_info=None, *,
                  weights=None, upstream=False, judge=None, **verl_kwargs):
    """verl's custom reward function (custom_reward_function.path=rewards.py; its default
    name is compute_score). verl calls it with keyword arguments, once per response:
    ground_truth is the answer (the parquet's reward_model.ground_truth), extra_info the
    row's extra_info dict, which may carry answer_type, keywords and question; data_source
    is not read. Returns {"score": total, "accuracy", "format", "fact", "consistency"}:
    verl trains on "score" and logs the other keys (its reward_extra_info).

    weights and upstream can come from custom_reward_function.reward_kwargs; judge (a
    callable) only from Python. Other keywords that verl passes (its reward loop adds
    reward_router_address and reward_model_tokenizer) are accepted and ignored.
    """
    info = extra_info or {}
    example = _example(ground_truth, info.get("answer_type"), info.get("keywords"), info.get("question"))
    scores = score(solution_str, example, weights, upstream=upstream, judge=judge)
    return {"score": scores.pop("total"), **scores}
