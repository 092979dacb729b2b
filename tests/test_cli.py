"""Every command answers --help with its usage, exit 0, and no side effect: no file in the
repository is created, changed or removed (bench/results/ included). The scripts run in
parallel, one torch thread each, so this takes about as long as the slowest import."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "__pycache__"}


def commands():
    # every script with a __main__ block, found rather than listed, so a new one is checked too
    scripts = [p for p in sorted(ROOT.glob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
               if '__name__ == "__main__"' in p.read_text()]
    return [[sys.executable, str(p)] for p in scripts] + [["bash", str(ROOT / "bench" / "benchmarks.sh")]]


def snapshot():
    files = {}
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in names:
            st = os.stat(os.path.join(folder, name))
            files[os.path.relpath(os.path.join(folder, name), ROOT)] = (st.st_mtime_ns, st.st_size)
    return files


def test_every_command_help_has_no_side_effects():
    cmds = commands()
    assert len(cmds) >= 15 and any("benchmarks.sh" in c[-1] for c in cmds)
    before = snapshot()
    assert any(p.startswith(os.path.join("bench", "results")) for p in before)
    # no bytecode either: --help must leave the tree exactly as it was
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    procs = [(c, subprocess.Popen(c + ["--help"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)) for c in cmds]
    failures = []
    for c, p in procs:
        out, err = p.communicate(timeout=120)
        name = os.path.relpath(c[-1], ROOT)
        if p.returncode != 0 or not out.lstrip().startswith("usage:") or os.path.basename(c[-1]) not in out:
            failures.append(f"{name}: exit {p.returncode}\n{out[:300]}\n{err[-500:]}")
    assert not failures, "\n\n".join(failures)
    after = snapshot()
    assert after == before, {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
