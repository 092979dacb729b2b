"""Shared fixtures. The repository root goes on sys.path so tests import the flat modules (data, model, ...)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def shared_data():
    """The real benchmark files (../shared/data from the repo root, or $MEDFACT_SHARED_DATA); skips if absent."""
    path = os.environ.get("MEDFACT_SHARED_DATA") or os.path.join(ROOT, "..", "shared", "data")
    if not os.path.isdir(path):
        pytest.skip(f"no shared data at {path} (set MEDFACT_SHARED_DATA)")
    return os.path.abspath(path)
