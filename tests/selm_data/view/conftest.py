"""The viewer's tests share one small store per module (viewstore.build_store)."""

from __future__ import annotations

import pytest

from selm_data.store.store import RunInfo, open_store
from viewstore import Built, build_store


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    store = open_store(tmp_path_factory.mktemp("view") / "store", create=True,
                       run=RunInfo.new("pytest"))
    return build_store(store)
