"""The README a newcomer reads and the notebook beside it: short, in the order a user needs, and every
results file they cite is there."""
import json
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


# A path that names one machine's folders (/root/..., /home/..., /work/..., /tmp/..., /Users/..., C:\...): a
# reader cannot paste it. Not a URL (https://host/home/...), not a relative path (../shared/data, runs/tmp),
# not a system program (/usr/bin/time).
MACHINE_ROOTS = ("root", "home", "work", "workspace", "tmp", "Users", "mnt", "media", "data", "scratch", "private",
                 "var/folders", "opt", "srv", "content", "kaggle", "nfs", "gpfs", "lustre")
ABSOLUTE = re.compile(r"(?<![\w.:/~\\-])(?:/(?:%s)(?![\w.-])[^\s`'\"()<>,;]*|[A-Za-z]:[\\/][^\s`'\"()<>,;]*)"
                      % "|".join(re.escape(r) for r in MACHINE_ROOTS))
# a string that starts like a command line: VAR=value ..., then a program or a script
COMMAND_START = re.compile(r"(?:[A-Z_]+=\S*\s+)*(?:python3?|bash|sh|make|torchrun|pip|\S*\.venv/bin/\S+|\S+\.(?:py|sh))\s")


def absolute_paths(text):
    return ABSOLUTE.findall(text)


def recorded_commands(obj, key=""):
    """The command lines a results file records: each string under a key named like command or cmd (commands,
    command_note, ...), and any other string that starts like a command line."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from recorded_commands(v, k)
    elif isinstance(obj, list):
        for v in obj:
            yield from recorded_commands(v, key)
    elif isinstance(obj, str) and (re.search(r"command|cmd", key, re.I) or COMMAND_START.match(obj)):
        yield obj


def machine_paths(root=ROOT):
    """(file, path) for each absolute machine path in the README, docs/*.md, and the commands bench/results records."""
    found = []
    docs = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(root, "docs")) if f.endswith(".md"))
    results = os.path.join(root, "bench", "results")
    for folder, _, files in os.walk(results):
        for f in sorted(files):
            name = os.path.relpath(os.path.join(folder, f), root)
            if f.endswith(".md"):
                docs.append(name)
            elif f.endswith(".json"):
                with open(os.path.join(root, name)) as fh:
                    found += [(name, p) for c in recorded_commands(json.load(fh)) for p in absolute_paths(c)]
    for name in docs:
        with open(os.path.join(root, name)) as fh:
            found += [(name, p) for p in absolute_paths(fh.read())]
    return found


def test_absolute_paths_are_told_from_urls_and_relative_ones():
    text = ("bash bench/benchmarks.sh --data /work/shared/data/vqa_rad --out=/home/me/runs `/root/x` (/tmp/y) "
            "C:\\Users\\me\\medfact /Users/me/data /tmp "
            "https://osf.io/89kps/ https://example.org/home/x ../shared/data/vqa_rad runs/tmp/x /usr/bin/time "
            "/workshop /path/to/Slake1.0 yes/no ~/medfact")
    assert absolute_paths(text) == ["/work/shared/data/vqa_rad", "/home/me/runs", "/root/x", "/tmp/y",
                                    "C:\\Users\\me\\medfact", "/Users/me/data", "/tmp"]


def test_recorded_commands_are_found_anywhere_in_a_results_file():
    res = {"command": "python a.py", "seeds": [{"command": "bash b.sh"}], "commands": ["c.py --x 1"], "cmd": "d",
           "runs": {"note": "OMP_NUM_THREADS=1 python e.py --out /tmp/f", "ckpt": "/work/g", "text": "a note"}}
    assert list(recorded_commands(res)) == ["python a.py", "bash b.sh", "c.py --x 1", "d",
                                            "OMP_NUM_THREADS=1 python e.py --out /tmp/f"]


def test_machine_paths_finds_a_planted_one(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "bench" / "results" / "old").mkdir(parents=True)
    (tmp_path / "README.md").write_text("bash bench/benchmarks.sh --data ../shared/data/vqa_rad\n")
    (tmp_path / "docs" / "NOTES.md").write_text("see https://osf.io/89kps/\n")
    (tmp_path / "bench" / "results" / "a.json").write_text(json.dumps({"command": "python x.py --out runs/a"}))
    assert machine_paths(str(tmp_path)) == []
    (tmp_path / "docs" / "NOTES.md").write_text("ran in /home/me/medfact\n")
    (tmp_path / "bench" / "results" / "old" / "b.json").write_text(
        json.dumps({"seeds": [{"command": "bash bench/benchmarks.sh --data /work/shared/data/slake"}]}))
    assert machine_paths(str(tmp_path)) == [(os.path.join("bench", "results", "old", "b.json"), "/work/shared/data/slake"),
                                            (os.path.join("docs", "NOTES.md"), "/home/me/medfact")]


def test_no_machine_paths_in_the_docs_or_the_recorded_commands():
    assert machine_paths() == []
