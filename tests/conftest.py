"""Shared fixtures. The repository root goes on sys.path so tests import the flat modules (data, model, ...).

rewards.py is standard library only, and so are its tests: `pytest tests` must run them where
only pytest is installed. There, every other test module (they import the training stack at
their top) is reported as skipped, with what is missing, instead of failing collection."""

import importlib.util
import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# data.load's row cache: one fresh folder per test session (subprocesses inherit it), never the user's
os.environ["MEDFACT_CACHE"] = tempfile.mkdtemp(prefix="medfact-test-cache-")

NEEDS_ONLY_PYTEST = {"test_rewards.py", "test_adapters.py"}
REQUIREMENTS = ("numpy", "PIL", "torch", "transformers", "tokenizers", "safetensors", "datasets", "tqdm")
MISSING = [name for name in REQUIREMENTS if importlib.util.find_spec(name) is None]


class NeedsRequirements(pytest.File):
    def collect(self):
        pytest.skip(f"{self.path.name} needs {', '.join(MISSING)} (pip install -r requirements.txt)")


def pytest_pycollect_makemodule(module_path, parent):
    if MISSING and module_path.name not in NEEDS_ONLY_PYTEST:
        return NeedsRequirements.from_parent(parent, path=module_path)
    return None


@pytest.fixture(scope="session")
def shared_data():
    """The real benchmark files (../shared/data from the repo root, or $MEDFACT_SHARED_DATA); skips if absent."""
    path = os.environ.get("MEDFACT_SHARED_DATA") or os.path.join(ROOT, "..", "shared", "data")
    if not os.path.isdir(path):
        pytest.skip(f"no shared data at {path} (set MEDFACT_SHARED_DATA)")
    return os.path.abspath(path)
