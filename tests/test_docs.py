"""The README a newcomer reads and the notebook beside it: short, in the order a user needs, and every
results file they cite is there."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "docs/EXPERIMENTS.md", "docs/RELIABILITY.md"]


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def cited_results(text):
    """The bench/results/ files a text names (a name without its extension stands for a .json/.md pair)."""
    return sorted({m.rstrip("./") for m in re.findall(r"bench/results/[\w./-]+(?![\w.<-])", text)})


def missing(paths, root=ROOT):
    return [p for p in paths if not (os.path.isdir(os.path.join(root, p)) or  # a folder of results, or a file
                                     any(os.path.isfile(os.path.join(root, p + ext)) for ext in ("", ".json", ".md")))]


def test_missing_finds_a_file_that_is_not_there(tmp_path):
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "a.json").write_text("{}")
    (tmp_path / "bench" / "results" / "old").mkdir()
    cited = cited_results("see `bench/results/a.json`, bench/results/a, bench/results/gone.json, bench/results/r_<n>.json, "
                          "bench/results/old/, bench/results/old/gone.json.")
    assert cited == ["bench/results/a", "bench/results/a.json", "bench/results/gone.json", "bench/results/old",
                     "bench/results/old/gone.json"]
    assert missing(cited, str(tmp_path)) == ["bench/results/gone.json", "bench/results/old/gone.json"]


def test_every_results_file_cited_exists():
    for name in DOCS:
        cited = cited_results(read(name))
        assert name != "README.md" or len(cited) >= 4, cited  # the README does cite its evidence
        assert missing(cited) == [], name


def test_the_readme_is_short_and_puts_first_what_a_user_needs_first():
    lines = read("README.md").splitlines()
    assert len(lines) <= 300
    first = "\n".join(lines[:150])
    for needed in ("## Quickstart", "make demo", "| after SFT + GRPO", "<!-- real-table: start",
                   "<!-- real-table: end -->", "grpo.py --ckpt", "torchrun --nproc_per_node", "## Supported models"):
        assert needed in first, needed
    text = "\n".join(lines)
    assert "docs/EXPERIMENTS.md" in text and "## Use a trained checkpoint with transformers" in text
