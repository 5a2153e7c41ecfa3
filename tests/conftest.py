"""Shared fixtures. Stage-specific fixtures live in tests/fixtures_<stage>.py and are
registered below so every test file can use them."""

import os

# Keep torch from fighting other processes for the 2 cores of a CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sys
from pathlib import Path

_HERE = Path(__file__).parent
sys.path.insert(0, str(_HERE))
# Every tests/fixtures_<stage>.py is a fixture plugin shared by all test files.
pytest_plugins = sorted(p.stem for p in _HERE.glob("fixtures_*.py"))
