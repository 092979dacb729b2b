"""
Where does GRPO's gain on the demo come from: seeing or reasoning?

    python bench/demo_flips.py runs/demo/eval_sft runs/demo/eval_grpo

Takes two evaluate.py output folders on the same questions (predictions.jsonl) and sorts each
answer the second model fixed or broke by whether the image description in its reasoning (the
demo traces' "The image shows ..." sentence) changed too. Same description, other answer: the
model saw the same thing and reasoned differently. Changed description: it saw differently.
"""

import json
import os
import re
import sys
from collections import Counter


def read(folder):
    with open(os.path.join(folder, "predictions.jsonl")) as f:
        return {r["id"]: r for r in map(json.loads, f)}


def description(text):
    m = re.search(r"The image shows (.*?)\.", text)
    return m.group(1) if m else None


if __name__ == "__main__":
    before, after = read(sys.argv[1]), read(sys.argv[2])
    flips = Counter()
    for k, a in before.items():
        b = after[k]
        if a["exact"] != b["exact"]:
            same = description(a["completion"]) == description(b["completion"])
            flips["fixed" if b["exact"] else "broke", "same description" if same else "description changed"] += 1
    for change in ("fixed", "broke"):
        n = sum(v for (c, _), v in flips.items() if c == change)
        print(f"{change} {n}: same image description {flips[change, 'same description']}, "
              f"description changed {flips[change, 'description changed']}")
