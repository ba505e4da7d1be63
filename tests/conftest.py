from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WSIMIL_PROGRESS", "0")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data; skip the test (with the reason) when it is absent, as in a user's clone."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared test data not available: {p} (only present beside the development checkout)")
    return p


@pytest.fixture
def digit_cohort(tmp_path):
    """60 digit bags written in TRIDENT layout; returns (features dir, manifest path)."""
    from wsimil.data.synthetic import make_digit_bags, write_bags

    manifest = write_bags(make_digit_bags(60, seed=3), tmp_path / "cohort")
    return tmp_path / "cohort" / "features", manifest
