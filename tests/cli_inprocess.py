"""`selm-data` run in this process, as `main()` runs it: fast enough to call hundreds of times,
and any exception other than a user error (exit 2) reaches the test as the traceback it is."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from selm_data import cli


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str


def selm_data(args: list[str], *, cwd: Path, monkeypatch: pytest.MonkeyPatch,
              capsys: pytest.CaptureFixture[str]) -> Outcome:
    """Exit code, stdout and stderr of `selm-data ARGS` run in `cwd`."""
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.chdir(cwd)
        m.setenv("COLUMNS", "200")
        m.delenv("SELM_MANIFEST", raising=False)
        m.setattr(sys, "argv", ["selm-data", *args])
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err)
