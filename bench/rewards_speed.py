"""
How fast is rewards.score, typically and at worst? One command, CPU only, a few seconds:

    python bench/rewards_speed.py
    python bench/rewards_speed.py --out bench/results/rewards_speed.json   # the committed results

1. Typical: completions/s of score() in one Python thread (pinned to one core where the OS
   allows) over a seeded mix of ~60-word completions: closed and open, right and wrong,
   consistent and contradicting, hedged, malformed, some multi-line. Six completions per
   example, as in GRPO with group size 6, and the caches are cleared before every pass, so
   each example's first scoring pays for normalising its gold answer and keywords. Both
   modes: default and upstream=True (no judge; a judge's network time would dominate).
   The median and best of several passes are reported: the machine may be shared.
2. Worst case: one score() call on hostile 1 MB completions (tag soup, unclosed tags,
   one giant token, a megabyte answer, ...), both modes; the median of 3 calls each.
3. Side by side: the released code's regexes (re, as in grpo_lgl.py) against upstream=True
   (the same rewards computed without backtracking) on growing tag soup.
Prints the numbers; writes them as JSON only with --out.
"""

import argparse
import json
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import rewards  # noqa: E402

PASSES = 7

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", default=None, help="write the results as JSON here (default: print only; the "
                                                "committed results: bench/results/rewards_speed.json)")

# -----------------------------------------------------------------------------
# a realistic mix

FINDINGS = [  # (finding, what it is, a sign of it on the image, keywords)
    ("pleural effusion", "fluid in the pleural space that blunts the costophrenic angle",
     "a meniscus at the left lung base", ["pleural effusion", "costophrenic angle", "meniscus"]),
    ("pneumothorax", "air in the pleural space that separates the lung from the chest wall",
     "a visceral pleural line without lung markings beyond it", ["pneumothorax", "pleural line", "lung markings"]),
    ("cardiomegaly", "an enlarged heart with a cardiothoracic ratio above one half",
     "a cardiac silhouette wider than half the thorax", ["cardiomegaly", "cardiothoracic ratio"]),
    ("consolidation", "alveolar air replaced by fluid or cells, often with air bronchograms",
     "a dense opacity with air bronchograms in the right lower lobe", ["consolidation", "air bronchograms", "opacity"]),
    ("pulmonary nodule", "a round opacity smaller than three centimetres",
     "a small round opacity in the upper zone", ["nodule", "opacity", "upper zone"]),
    ("rib fracture", "a break in the cortex of a rib, sometimes displaced",
     "a cortical step in the posterior seventh rib", ["rib fracture", "cortex", "X-ray"]),
]
OPEN_QUESTIONS = [  # (what the reasoning is about, gold answer, a wrong answer)
    ("where the nodule is", "upper zone", "lower zone"),
    ("which side the effusion is on", "left", "right"),
    ("which organ is abnormal", "lung", "heart"),
    ("which modality was used", "x ray", "ct"),
    ("how many nodules there are", "two", "three"),
]
FILLER = ("The image is a frontal chest radiograph of adequate inspiration. The trachea is "
          "midline and the lungs are expanded. The mediastinum and bony thorax are unremarkable. ")


def make_mix(n_examples=340, group_size=6, seed=0):
    rng = random.Random(seed)
    pairs = []
    for i in range(n_examples):
        finding, definition, sign, keywords = FINDINGS[i % len(FINDINGS)]
        closed = rng.random() < 0.6
        if closed:
            gold = rng.choice(["yes", "no"])
            example = {"answer": gold, "answer_type": "closed", "keywords": keywords + [f"term{i}"]}
        else:
            topic, gold, wrong = OPEN_QUESTIONS[i % len(OPEN_QUESTIONS)]
            example = {"answer": gold, "answer_type": "open", "keywords": keywords[:2] + [f"term{i}"]}
        for _ in range(group_size):
            present = rng.random() < 0.5
            sentences = [f"The question asks about {finding}.", f"{finding.capitalize()} is {definition}.",
                         FILLER + (f"The image shows {sign}." if present else "No such sign is seen.")]
            if closed:
                conclusion = f"So, a {finding} is present." if present else f"So, there is no evidence of {finding}."
                answer = rng.choice(["yes", "Yes.", "yes" if present else "no", "no", "yes or no"])
            else:
                sentences[0] = f"The question asks {topic}."
                said = rng.choice([gold, gold, wrong])
                conclusion = f"So, the answer is {said}."
                answer = rng.choice([said, said, gold, f"{gold} or {wrong}"])
            think = ("\n" if rng.random() < 0.3 else " ").join(sentences + [conclusion])
            kind = rng.random()
            if kind < 0.9:
                completion = f"<think>{think}</think><answer>{answer}</answer>"
            elif kind < 0.95:
                completion = f"{think} {answer}"                               # no tags
            else:
                completion = f"<think>{think}</think>\n{answer}"              # no answer block
            pairs.append((completion, example))
    return pairs


def clear_caches():
    for cached in (rewards._normalize_cached, rewards._word_forms, rewards._keyword_forms):
        cached.cache_clear()


def rate(pairs, upstream):
    clear_caches()
    t0 = time.perf_counter()
    for completion, example in pairs:
        rewards.score(completion, example, upstream=upstream)
    return len(pairs) / (time.perf_counter() - t0)

# -----------------------------------------------------------------------------
# hostile inputs

MB = 1 << 20
HOSTILE = {
    "1MB of words in the think block": "<think>" + "the pleural space is clear " * (MB // 27) + "So, no.</think><answer>no</answer>",
    "1MB tag soup": "<think><answer></think></answer>" * (MB // 32),
    "1MB of unclosed <answer>": "<answer>" * (MB // 8),
    "1MB of '</think> <answer>' pairs": "<think>" + "</think> <answer>" * (MB // 17),
    "1MB token in each block": "<think>" + "a" * MB + "</think><answer>" + "b" * MB + "</answer>",
    "1MB answer block": "<think>So, no.</think><answer>" + "no " * (MB // 3) + "</answer>",
    "1MB one-sentence conclusion": "<think>" + "no " * (MB // 3) + "</think><answer>no</answer>",
    "1MB of newlines": "<think>" + "\n" * MB + "</think><answer>no</answer>",
    "1MB unicode reasoning": "<think>" + "\u80f8\u8154\u79ef\u6db2 \uff45\uff46\uff46\uff55\uff53\uff49\uff4f\uff4e " * (MB // 15) + "</think><answer>no</answer>",
}
HOSTILE_EXAMPLE = {"answer": "no", "answer_type": "closed", "keywords": ["pleural effusion", "no", "effusion"]}


def call_ms(fn, *args, repeats=3, **kwargs):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)

# -----------------------------------------------------------------------------
# the released code's regexes (r1-v/src/open_r1/grpo_lgl.py), as it runs them


def released_regexes(content):
    re.fullmatch(r"<think>.*?</think>\s*<answer>.*?</answer>", content, re.DOTALL)  # format_reward
    re.search(r"<answer>(.*?)</answer>", content)                                   # accuracy_reward
    re.search(r"<think>(.*?)</think>", content)                                     # consistent_reward


def released_soup(size):
    # a single line of think/answer openings with no closing answer tag
    return ("<think></think><answer>" * (size // 23 + 1))[:size]


def cpu_model():
    try:  # Linux; platform.processor() is empty there
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(args):
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    pairs = make_mix()
    words = statistics.mean(len(c.split()) for c, _ in pairs)
    closed = sum(e["answer_type"] == "closed" for _, e in pairs) / len(pairs)
    print(f"rewards.score on {len(pairs)} completions (mean {words:.0f} words, {closed:.0%} closed), "
          f"{PASSES} passes, python {platform.python_version()}, {cpu_model()}, load {os.getloadavg()[0]:.1f}")
    typical = {}
    for mode, upstream in (("default", False), ("upstream", True)):
        rates = [rate(pairs, upstream) for _ in range(PASSES)]
        typical[mode] = {"median_per_s": round(statistics.median(rates)), "best_per_s": round(max(rates)),
                         "median_us_per_call": round(1e6 / statistics.median(rates), 1)}
        print(f"  {mode:9s} {typical[mode]['median_per_s']:>8,} completions/s median "
              f"({typical[mode]['best_per_s']:,} best, {typical[mode]['median_us_per_call']} us each)")

    print("\nworst case: one score() call, median of 3 (ms)")
    print(f"  {'input':36s} {'default':>8s} {'upstream':>9s}")
    worst = {}
    for name, completion in HOSTILE.items():
        worst[name] = {mode: round(call_ms(rewards.score, completion, HOSTILE_EXAMPLE, upstream=up), 2)
                       for mode, up in (("default", False), ("upstream", True))}
        print(f"  {name:36s} {worst[name]['default']:8.2f} {worst[name]['upstream']:9.2f}")
    worst_max = {mode: max(v[mode] for v in worst.values()) for mode in ("default", "upstream")}
    print(f"  {'max':36s} {worst_max['default']:8.2f} {worst_max['upstream']:9.2f}")

    print("\nside by side on one-line tag soup (ms): the released regexes vs upstream=True")
    side = {}
    for size in (4_000, 16_000, 64_000):
        soup = released_soup(size)
        released = call_ms(released_regexes, soup, repeats=1)
        ours = call_ms(rewards.score, soup, HOSTILE_EXAMPLE, upstream=True)
        side[str(size)] = {"released_regexes_ms": round(released, 2), "upstream_true_score_ms": round(ours, 3),
                           "ratio": round(released / ours)}
        print(f"  {size:>7,} chars  released {released:9.2f}   upstream=True {ours:7.3f}   ({released / ours:,.0f}x)")

    if not args.out:
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(["python", "bench/rewards_speed.py", *sys.argv[1:]]),
        "python": platform.python_version(), "cpu": cpu_model(),
        "cpus_visible": os.cpu_count(), "loadavg_1min_at_start": os.getloadavg()[0],
        "typical": {"completions": len(pairs), "mean_words": round(words, 1), "closed_share": round(closed, 3),
                    "completions_per_example": 6, "passes": PASSES, "caches_cleared_each_pass": True,
                    **typical},
        "worst_case_ms": worst, "worst_case_max_ms": worst_max,
        "released_regex_vs_upstream_true": side,
    }, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main(parser.parse_args())
