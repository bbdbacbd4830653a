"""A build's two phases: the whole shard is generated and the generator freed before the ranker
loads; a kill in either phase resumes to the pairs of an uninterrupted build."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import weakref
from pathlib import Path

import polars as pl
import pytest
import yaml

from helpers import manifest_dict
from selm_data import open_store, verify
from selm_data.builder import iteration as build_module
from selm_data.builder.iteration import build
from selm_data.manifest import Manifest
from selm_data.store.store import RunInfo

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[3]
PAIR_CONTENT = ["pair_id", "prompt_id", "iteration", "ranking_id", "rule", "chosen_id",
                "rejected_id", "ref_id", "chosen_score", "rejected_score", "margin", "is_tie",
                "chosen_origin", "rejected_origin"]


def open_new(path):
    return open_store(path, create=True, run=RunInfo.new("pytest phases"))


def pair_content(store_path, iteration: int = 1) -> pl.DataFrame:
    lf = open_store(store_path).scan("pairs").filter(pl.col("iteration") == iteration)
    return lf.select(PAIR_CONTENT).collect().sort("pair_id")


def test_the_ranker_loads_only_after_the_generator_is_freed(tmp_path, tiny_lm, tiny_rm,
                                                            monkeypatch):
    m = Manifest.model_validate(manifest_dict(tmp_path, tiny_lm, tiny_rm))
    real_generator, real_ranker = build_module.make_generator, build_module.make_ranker
    alive: list[weakref.ref] = []
    events: list[str] = []

    def make_generator(*args, **kwargs):
        generator = real_generator(*args, **kwargs)
        alive.append(weakref.ref(generator))
        events.append("generator")
        close = generator.close

        def closed() -> None:
            events.append("closed")
            close()

        generator.close = closed
        return generator

    def make_ranker(spec):
        # No gc.collect() here: the build itself must have dropped and collected the model.
        living = [ref for ref in alive if ref() is not None]
        assert alive and not living, "the ranker is loaded while a generator is alive"
        events.append("ranker")
        return real_ranker(spec)

    monkeypatch.setattr(build_module, "make_generator", make_generator)
    monkeypatch.setattr(build_module, "make_ranker", make_ranker)
    heard: list[tuple[str, int, int]] = []
    report = build(m, 1, open_new(m.store), progress=lambda *a: heard.append(a),
                   generation_progress=lambda *a: heard.append(a))
    assert events == ["generator", "closed", "ranker"]
    assert (report.generated, report.pairs) == (12, 12)
    # Every response is committed (in 3 commits of 4) before the first pair is.
    assert heard == [("responses", 4, 12), ("responses", 8, 12), ("responses", 12, 12),
                     ("prompts", 4, 12), ("prompts", 8, 12), ("prompts", 12, 12)]


def test_a_generator_passed_in_stays_the_callers(tmp_path, tiny_lm, tiny_rm):
    from selm_data.generation.backends import make_generator

    m = Manifest.model_validate(manifest_dict(tmp_path, tiny_lm, tiny_rm))
    generator = make_generator(m.generation, m.policy, str(tiny_lm), None)
    build(m, 1, open_new(m.store), generator=generator)
    assert generator.model is not None, "not closed: the caller may reuse it"
    gc.collect()


WORKER = """
import sys, yaml
from selm_data import open_store
from selm_data.builder.iteration import build
from selm_data.manifest import Manifest
from selm_data.store.store import RunInfo
m = Manifest.model_validate(yaml.safe_load(open(sys.argv[1])))
store = open_store(m.store, create=True, run=RunInfo.new("worker"))
stop_at = sys.argv[2]
def progress(stage, done, total):
    print(stage, done, total, flush=True)
    if stage == stop_at:
        sys.stdin.readline()  # wait here to be killed: the kill lands in this phase
report = build(m, 1, store, progress=progress, generation_progress=progress)
print("done", report.generated, report.ranked, flush=True)
"""


def run_worker(manifest_file: Path, stop_at: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", WORKER, str(manifest_file), stop_at],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("phase", ["responses", "prompts"])
def test_a_kill_in_either_phase_resumes_to_the_same_pairs(tmp_path, tiny_lm, tiny_rm, phase):
    reference = Manifest.model_validate(manifest_dict(tmp_path / "a", tiny_lm, tiny_rm))
    build(reference, 1, open_new(reference.store))
    expected = pair_content(reference.store)

    m = manifest_dict(tmp_path / "b", tiny_lm, tiny_rm)
    path = tmp_path / "b" / "manifest.yaml"
    path.write_text(yaml.safe_dump(m))
    worker = run_worker(path, phase)
    lines = []
    while not (lines and lines[-1].startswith(phase)):  # the worker now waits to be killed
        lines.append(worker.stdout.readline())
        if not lines[-1]:
            break
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert lines[-1].startswith(f"{phase} 4 "), "".join(lines) + worker.stderr.read()
    store = open_store(m["store"])
    policy = store.scan("responses").filter(pl.col("origin") == "policy").collect()
    paired = pair_content(Path(m["store"])).height
    if phase == "responses":  # killed after the first commit of responses, before any pair
        assert (policy.height, paired) == (4, 0)
    else:  # killed after the first chunk of pairs: every response was committed before
        assert (policy.height, paired) == (12, 4)
    resumed = run_worker(path, "none")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    generated, ranked = (int(x) for x in out.split()[-2:])
    assert generated == 12 - policy.height, "only unfinished work is redone"
    assert ranked == 12 - paired
    assert pair_content(Path(m["store"])).equals(expected)
    assert verify(open_store(m["store"])) == []
