"""Where tests find benchmark files: small committed fixtures, or the full data folder.

Tests that need *a* benchmark file read ``FIXTURES`` (always present). Tests over the *full* files
take ``full_data()``: it returns ``$TIRFORGE_DATA`` or ``../shared/data``; where neither exists
(a plain clone) the test is skipped, except under ``TIRFORGE_REQUIRE_DATA=1`` (set by ``.ci/run``,
which also checks the folder exists), where it fails: CI can never skip them silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tirforge.trajectories.datasets import data_root

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def full_data() -> Path:
    root = data_root()
    if (root / "gsm8k" / "test.jsonl").is_file():
        return root
    msg = f"no full benchmark data at {root} (set TIRFORGE_DATA or clone beside ../shared/data)"
    if os.environ.get("TIRFORGE_REQUIRE_DATA", "0") not in ("0", ""):
        pytest.fail(msg + "; TIRFORGE_REQUIRE_DATA=1 requires it")
    pytest.skip(msg)
