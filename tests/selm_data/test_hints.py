"""Messages that point the right way: every command a hint, an error or a help text suggests
(written in backticks in the code, as `selm-data build --iter {n}`) exists, with its flags.

The commands are collected from the source itself, so a new hint is checked the day it is
written: each one's `--help` runs through the real entry point and must exit 0 and list every
flag the hint names.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from helpers import chain_rows
from selm_data import cli as data_cli
from selm_data.builder.iteration import policy_for, train_hint
from selm_data.errors import SelmError
from selm_data.manifest import load_manifest
from selm_train import cli as train_cli

REPO = Path(__file__).resolve().parents[2]
SUGGESTED = re.compile(r"`(selm-(?:data|train)\b[^`]*)`")
WORD = re.compile(r"[a-z][a-z-]*")  # a (sub)command's name; placeholders are upper case or {x}


def _texts(tree: ast.AST) -> list[str]:
    """Every string literal, f-strings with their fields written `{}`."""
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append(node.value)
        elif isinstance(node, ast.JoinedStr):
            out.append("".join(str(v.value) if isinstance(v, ast.Constant) else "{}"
                               for v in node.values))
    return out


def suggested_commands() -> dict[str, set[str]]:
    """Suggested command lines, by the file and line they come from."""
    found: dict[str, set[str]] = {}
    for package in ("selm_data", "selm_train"):
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for text in _texts(tree):
                for command in SUGGESTED.findall(text):
                    found.setdefault(" ".join(command.split()), set()).add(
                        str(path.relative_to(REPO)))
    return found


def _split(command: str) -> tuple[str, list[str], list[str]]:
    """tool, subcommand path and flags of a suggested command line."""
    tool, *rest = command.split()
    sub: list[str] = []
    for token in rest:
        if not WORD.fullmatch(token) or token.startswith("-"):
            break
        sub.append(token)
    flags = [t.split("=")[0] for t in rest if t.startswith("--")]
    return tool, sub, flags


def _help(tool: str, sub: list[str], monkeypatch: pytest.MonkeyPatch,
          capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    main = data_cli.main if tool == "selm-data" else train_cli.main
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setenv("COLUMNS", "200")
        m.setattr(sys, "argv", [tool, *sub, "--help"])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_the_code_suggests_commands() -> None:
    commands = suggested_commands()
    assert len(commands) > 20  # the collector finds them (not a vacuous pass)
    assert any(c.startswith("selm-train train --snapshot") for c in commands)
    assert any(c.startswith("selm-data build --iter") for c in commands)


def test_every_suggested_command_and_flag_exists(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    helps: dict[tuple[str, ...], tuple[int, str]] = {}
    wrong = []
    for command, where in sorted(suggested_commands().items()):
        tool, sub, flags = _split(command)
        key = (tool, *sub)
        if key not in helps:
            helps[key] = _help(tool, sub, monkeypatch, capsys)
        code, text = helps[key]
        if code != 0:
            wrong.append(f"{command!r} ({', '.join(sorted(where))}): "
                         f"`{' '.join(key)} --help` exits {code}")
        missing = [f for f in flags if f not in text]
        if code == 0 and missing:
            wrong.append(f"{command!r} ({', '.join(sorted(where))}): no {missing} in "
                         f"`{' '.join(key)} --help`")
    assert not wrong, "\n".join(wrong)


def test_a_missing_checkpoint_names_the_training_command(tmp_path: Path, store) -> None:
    manifest = load_manifest(REPO / "manifests" / "demo.yaml")
    with pytest.raises(SelmError) as before:
        policy_for(store, manifest, 2)
    assert (f"`selm-data export --iter 1` and then `selm-train train --snapshot "
            f"{store.uri}@NAME`") in str(before.value)

    rows = chain_rows(iteration=1, n_prompts=1)
    store.append("snapshots", rows["snapshots"])
    with pytest.raises(SelmError) as after:
        policy_for(store, manifest, 2)
    command = f"selm-train train --snapshot {store.uri}@iter1"
    assert f"Train it with `{command}`, or pass --policy PATH" in str(after.value)
    assert train_hint(store, 1) == f"`{command}`"
