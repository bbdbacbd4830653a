"""The selm-data and selm-train commands, run as a user runs them (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import chain_rows, write_chain
from selm_data import open_store
from selm_data.cli import command_line
from selm_data.manifest import load_manifest
from selm_data.store.store import RunInfo

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(tool: str, *args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("SELM_MANIFEST", None)
    proc = subprocess.run(
        [str(BIN / tool), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    data = yaml.safe_load((REPO / "manifests/demo.yaml").read_text(encoding="utf-8"))
    data["store"] = str(tmp_path / "store")
    path = tmp_path / "selm.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_help_on_every_command(tmp_path):
    for args in ([], ["init"], ["status"], ["log"], ["verify"], ["export"], ["lineage"],
                 ["inspect"], ["diff"], ["push"], ["eval"], ["compare"], ["winrates"]):
        out = run("selm-data", *args, "--help", cwd=tmp_path).stdout
        assert "Usage: selm-data" in out
        assert "--manifest" in out or not args
    assert "plan" in run("selm-train", "--help", cwd=tmp_path).stdout
    assert "overrides" in run("selm-train", "plan", "--help", cwd=tmp_path).stdout


def test_init_status_log_verify(tmp_path, manifest):
    out = run("selm-data", "init", cwd=tmp_path).stdout  # finds ./selm.yaml by itself
    assert f"store ready at {tmp_path / 'store'}" in out
    store = open_store(tmp_path / "store", run=RunInfo.new("pytest"))
    runs = store.scan("runs").collect()
    assert runs["command"].to_list() == ["selm-data init"]
    assert runs["manifest_hash"].to_list() == [load_manifest(manifest).hash()]
    rows = chain_rows(iteration=2, n_prompts=3)
    write_chain(store, rows)

    status = run("selm-data", "status", "--store", str(tmp_path / "store"), cwd=tmp_path).stdout
    lines = status.replace("┃", "│").splitlines()
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in lines]
    header = next(c for c in cells if c[:2] == ["iteration", "prompts"])
    assert header == ["iteration", "prompts", "generated", "failed", "rankings", "pairs", "ties"]
    assert ["2", "3", "3", "0", "3", "3", "0"] in cells

    log = run("selm-data", "log", "--manifest", str(manifest), "--table", "pairs",
              cwd=tmp_path).stdout
    assert "CREATE TABLE" in log and "WRITE" in log and store.run.run_id in log

    assert "are consistent" in run("selm-data", "verify", cwd=tmp_path).stdout
    store.append("pairs", [{**rows["pairs"][0], "rule": "replace", "rejected_id": "0" * 32}])
    bad = run("selm-data", "verify", cwd=tmp_path, ok=False)
    assert bad.returncode == 1 and "references" in bad.stdout


def test_user_errors_exit_2_with_a_message(tmp_path):
    missing = run("selm-data", "status", "--store", str(tmp_path / "none"), cwd=tmp_path,
                  ok=False)
    assert missing.returncode == 2 and "selm-data init --store" in missing.stderr
    assert "Traceback" not in missing.stderr
    no_manifest = run("selm-data", "status", cwd=tmp_path, ok=False)
    assert no_manifest.returncode == 2 and "no manifest given" in no_manifest.stderr


def test_selm_train_plan_shows_each_iteration(tmp_path):
    out = run("selm-train", "plan", "-m", str(REPO / "manifests/zephyr-7b-selm.yaml"),
              cwd=tmp_path).stdout
    rows = [line for line in out.splitlines() if line.strip().startswith("│")]
    assert len(rows) == 4
    assert "original" in rows[0] and "dpo" in rows[0]
    assert "selm" in rows[3] and "1e-07" in rows[3]


def test_secrets_never_reach_the_recorded_command():
    line = command_line(["push", "snap", "--token", "hf_abc", "--api-key=sk-1", "--hub-token",
                         "hf_x", "--repo-id", "org/name"])
    assert "hf_abc" not in line and "sk-1" not in line and "hf_x" not in line
    assert line == ("selm-data push snap --token *** --api-key=*** --hub-token *** "
                    "--repo-id org/name")


def test_sources_check_reports_layout_counts_and_reasons(tmp_path):
    data = REPO.parent / "shared" / "data" / "ultrafeedback_binarized_1000.jsonl"
    env_cache = {"HF_DATASETS_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [str(BIN / "selm-data"), "sources", "check", str(data)], cwd=tmp_path,
        env={**os.environ, **env_cache, "COLUMNS": "200"}, capture_output=True, text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    cells = {line.split("│")[1].strip(): line.split("│")[2].strip()
             for line in proc.stdout.splitlines() if line.count("│") == 3}
    assert cells["layout"] == "flat" and cells["rows read"] == "1000"
    assert cells["usable examples"] == "994"
    assert cells["quarantined: chosen equals rejected"] == "4"
    assert "row 478: missing rejected" in proc.stdout


def test_export_inspect_diff_and_push_dry_run(tmp_path):
    """The commands of a built store, end to end: export two snapshots, inspect with a plot,
    diff them, and write a push's files without pushing."""
    store = open_store(tmp_path / "store", create=True, run=RunInfo.new("pytest"))
    for iteration in (1, 2):
        write_chain(store, chain_rows(iteration=iteration, n_prompts=2 + iteration,
                                      tag="cli"))
    where = ("--store", str(tmp_path / "store"))
    for iteration in ("1", "2"):
        out = run("selm-data", "export", "--iter", iteration, "--name", f"s{iteration}", *where,
                  cwd=tmp_path).stdout
        assert f"exported s{iteration}: {2 + int(iteration)} pairs" in out
    shown = run("selm-data", "inspect", *where, "--plot", str(tmp_path / "p.png"),
                cwd=tmp_path).stdout
    assert "wrote" in shown and (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "y_ref" in shown
    assert "only in" in run("selm-data", "diff", "s1", "s2", *where, cwd=tmp_path).stdout.lower()
    dry = run("selm-data", "push", "s2", "--dry-run", str(tmp_path / "repo"), *where,
              cwd=tmp_path).stdout
    assert "nothing pushed" in dry and (tmp_path / "repo" / "README.md").is_file()
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == [
        "README.md", "data", "selm_lineage.json"]
    bad = run("selm-data", "push", "s2", *where, cwd=tmp_path, ok=False)
    assert bad.returncode == 2 and "--repo-id" in bad.stderr + bad.stdout
