from __future__ import annotations

from pathlib import Path

import pytest

from selm_data.store import RunInfo, Store, open_store

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(tmp_path / "store", create=True, run=RunInfo.new("pytest"))
