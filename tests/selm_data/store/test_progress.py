"""Progress of long steps: a bar with rate and ETA on a terminal (rank 0), one closing line in a
log, nothing from the other ranks, and nothing on stdout."""

from __future__ import annotations

import os

import pytest

from selm_data.store import progress
from selm_data.store.progress import steps


def _run(show: bool = True) -> None:
    with steps("reference log-probs", 6, unit="pairs", show=show) as bar:
        for _ in range(3):
            bar.update(2)


def test_a_terminal_gets_a_bar_with_rate_and_eta(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(progress, "interactive", lambda: True)
    _run()
    out, err = capsys.readouterr()
    assert out == ""
    assert "reference log-probs" in err and "6/6" in err
    assert "pairs/s" in err and "<" in err  # tqdm's [elapsed<remaining, rate]


def test_a_log_gets_one_line_for_a_long_step(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(progress, "interactive", lambda: False)
    _run()
    assert capsys.readouterr() == ("", "")  # quicker than LOG_AFTER_S: nothing at all
    monkeypatch.setattr(progress, "LOG_AFTER_S", 0.0)
    _run()
    out, err = capsys.readouterr()
    assert out == "" and "\r" not in err
    (line,) = err.splitlines()
    assert line.startswith("reference log-probs: 6 pairs in ") and line.endswith("pairs/s)")


def test_other_ranks_stay_silent(monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(progress, "LOG_AFTER_S", 0.0)
    for terminal in (True, False):
        monkeypatch.setattr(progress, "interactive", lambda t=terminal: t)
        _run(show=False)
        assert capsys.readouterr() == ("", "")


def test_bytes_are_counted_in_mib(monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(progress, "interactive", lambda: False)
    monkeypatch.setattr(progress, "LOG_AFTER_S", 0.0)
    with steps("push: 3 files", 3 * 2**20, unit="B") as bar:
        bar.update(3 * 2**20)
    assert capsys.readouterr().err.startswith("push: 3 files: 3.0 MiB in ")


def test_library_bars_are_off_in_a_log_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' "Loading weights" and datasets' split bars go through huggingface_hub."""
    for terminal, user, expected in ((False, None, "1"), (True, None, None), (False, "0", "0")):
        if user is None:
            monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
        else:
            monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", user)
        monkeypatch.setattr(progress, "interactive", lambda t=terminal: t)
        progress.quiet_libraries()
        assert os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == expected
