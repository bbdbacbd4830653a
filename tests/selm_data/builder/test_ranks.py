"""Ranks are shards: `selm-data build` under real torchrun and a fake SLURM (plain processes
with srun's variables), against one process; a rank killed mid-build, relaunched with another
world size; launcher detection and GPU blocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow.fs as pafs
import pytest
import yaml

from helpers import manifest_dict
from selm_data import SelmError, open_store, verify
from selm_data.builder.iteration import Shard, build
from selm_data.builder.ranks import shard_for, shard_progress
from selm_data.generation import launcher
from selm_data.generation.launcher import Launch, detect, gpu_block
from selm_data.manifest import Manifest
from selm_data.store.leases import list_leases
from selm_data.store.store import RunInfo

REPO = Path(__file__).resolve().parents[3]
SCORES = ["chosen_score", "rejected_score", "margin"]
PAIR_CONTENT = ["pair_id", "prompt_id", "iteration", "ranking_id", "rule", "chosen_id",
                "rejected_id", "ref_id", "is_tie", "chosen_origin", "rejected_origin", *SCORES]


# -- launcher detection, without processes --------------------------------------------------

def test_each_launcher_is_detected_and_the_innermost_wins():
    assert detect({}) == Launch("none", 0, 1, 0, "none")
    torch = detect({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                    "TORCHELASTIC_RUN_ID": "abc", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"})
    assert (torch.launcher, torch.rank, torch.world, torch.local_rank) == ("torchrun", 5, 8, 1)
    assert "abc" in torch.launch_id
    slurm = detect({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                    "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"})
    assert (slurm.launcher, slurm.rank, slurm.world, slurm.local_rank) == ("srun", 3, 4, 1)
    assert slurm.launch_id == "srun:SLURM_JOB_ID=77/SLURM_STEP_ID=0"
    mpi = detect({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3",
                  "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_MCA_ess_base_jobid": "9"})
    assert (mpi.launcher, mpi.rank, mpi.world, mpi.local_rank) == ("mpirun", 2, 3, 0)
    with pytest.raises(SelmError, match="RANK is set but WORLD_SIZE is not"):
        detect({"RANK": "0"})
    with pytest.raises(SelmError, match="SLURM_PROCID=4 but SLURM_NTASKS=4"):
        detect({"SLURM_PROCID": "4", "SLURM_NTASKS": "4"})


def test_shard_follows_the_rank_and_refuses_to_disagree():
    rank = Launch("torchrun", 2, 4, 2, "x")
    assert shard_for(None, rank) == Shard(2, 4)
    assert shard_for("2/4", rank) == Shard(2, 4)
    with pytest.raises(SelmError, match="disagrees with torchrun, which started this process "
                                        "as rank 2 of 4"):
        shard_for("0/2", rank)
    assert shard_for("1/3", Launch("none", 0, 1, 0, "none")) == Shard(1, 3)


def test_gpu_blocks_per_local_rank_and_tensor_parallel(monkeypatch):
    eight = [str(i) for i in range(8)]
    assert gpu_block(Launch("torchrun", 9, 16, 1, "x"), 1, eight) == ["1"]
    assert gpu_block(Launch("torchrun", 3, 4, 3, "x"), 2, eight) == ["6", "7"]
    assert gpu_block(Launch("srun", 3, 4, 3, "x"), 1, ["0"]) == ["0"]  # srun narrowed it
    with pytest.raises(SelmError, match=r"rank 4 \(local rank 4 on this node\) needs GPUs 8..9 "
                                        r".*start at most 4 processes per node"):
        gpu_block(Launch("torchrun", 4, 5, 4, "x"), 2, eight)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.delenv(launcher.BOUND, raising=False)
    assert launcher.bind_gpus(Launch("torchrun", 1, 2, 1, "x"), 2) == ["6", "7"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7" and launcher.gpu_index() == 0
    assert launcher.bind_gpus(Launch("torchrun", 1, 2, 1, "x"), 2) == ["6", "7"]  # once only


# -- real processes ----------------------------------------------------------------------------

def write_manifest(folder: Path, tiny_lm: Path, tiny_rm: Path) -> Path:
    m = manifest_dict(folder, tiny_lm, tiny_rm)
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(m))
    return path


def pair_content(store: Path) -> pl.DataFrame:
    return (open_store(store).scan("pairs").filter(pl.col("iteration") == 1)
            .select(PAIR_CONTENT).collect().sort("pair_id"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_lm, tiny_rm) -> pl.DataFrame:
    """Iteration 1 built by one plain process."""
    folder = tmp_path_factory.mktemp("one-process")
    m = Manifest.model_validate(manifest_dict(folder, tiny_lm, tiny_rm))
    build(m, 1, open_store(m.store, create=True, run=RunInfo.new("pytest")))
    return pair_content(Path(m.store))


def child_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_", "OMPI_"))}
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", COLUMNS="200",
               HF_DATASETS_CACHE=str(tmp / "hf-cache"), **extra)
    return env


def torchrun(k: int, manifest: Path, tmp: Path) -> subprocess.Popen[str]:
    """`torchrun --nproc_per_node k -m selm_data.cli build --iter 1`, as a user types it."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(k),
         "-m", "selm_data.cli", "build", "--iter", "1", "--manifest", str(manifest)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(tmp))


def fake_srun(k: int, manifest: Path, tmp: Path, step: str) -> list[subprocess.Popen[str]]:
    """k plain processes with the variables srun sets for one job step."""
    return [subprocess.Popen(
        [sys.executable, "-m", "selm_data.cli", "build", "--iter", "1", "--manifest",
         str(manifest)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=child_env(tmp, SLURM_PROCID=str(r), SLURM_NTASKS=str(k), SLURM_LOCALID=str(r),
                      SLURM_JOB_ID="4242", SLURM_STEP_ID=step))
        for r in range(k)]


def finish(procs: list[subprocess.Popen[str]]) -> list[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
        outs.append(out)
    return outs


def assert_same_pairs(store: Path, reference: pl.DataFrame) -> None:
    """The same pairs as one process; scores to float precision (a reward model's logits move
    by ~1e-6 with the composition of its batch, which differs between shards)."""
    got = pair_content(store)
    assert got.height == reference.height == 12
    assert got.drop(SCORES).equals(reference.drop(SCORES))
    for column in SCORES:
        largest = (got[column] - reference[column]).abs().max()
        assert isinstance(largest, float) and largest < 1e-4
    assert verify(open_store(store)) == []


@pytest.mark.slow
@pytest.mark.parametrize("launch,k", [("torchrun", 2), ("torchrun", 4), ("srun", 3)])
def test_ranks_build_one_iteration_equal_to_one_process(launch, k, tmp_path, tiny_lm, tiny_rm,
                                                        reference):
    manifest = write_manifest(tmp_path, tiny_lm, tiny_rm)
    procs = [torchrun(k, manifest, tmp_path)] if launch == "torchrun" else fake_srun(
        k, manifest, tmp_path, step="0")
    out = "".join(finish(procs))
    assert_same_pairs(tmp_path / "store", reference)
    # One merged report, by rank 0, of every shard; each rank's lines carry its prefix.
    assert out.count(f"shard all {k} (merged)") == 1, out
    for r in range(k):
        assert f"[rank {r}/{k}] shard {r}-of-{k} done" in out, out
    records = sorted((tmp_path / "store" / "_builds" / "iter=1").glob("shard=*.json"))
    assert [p.name for p in records] == [f"shard={r}-of-{k}.json" for r in range(k)]


@pytest.mark.slow
def test_a_killed_rank_is_finished_by_a_relaunch_with_another_world_size(tmp_path, tiny_lm,
                                                                         tiny_rm, reference):
    manifest = write_manifest(tmp_path, tiny_lm, tiny_rm)
    store = tmp_path / "store"
    job = torchrun(2, manifest, tmp_path)
    assert job.stdout is not None
    seen = ""
    while "[rank 1/2] iteration 1: generating 4/" not in seen:  # its first chunk is committed
        line = job.stdout.readline()
        assert line, seen
        seen += line
    holder = next(h for h, _ in list_leases(store / "_leases") if h.work.endswith("1-of-2"))
    os.kill(holder.pid, signal.SIGKILL)  # rank 1 dies mid-build; torchrun stops rank 0
    job.communicate(timeout=300)
    assert job.returncode != 0
    partial = pair_content(store)
    assert partial.height < 12
    # status shows each shard's lease and how far it came; the killed rank's lease is stale.
    status = subprocess.run([sys.executable, "-m", "selm_data.cli", "status", "--manifest",
                             str(manifest)], capture_output=True, text=True,
                            env=child_env(tmp_path), timeout=300)
    assert status.returncode == 0, status.stderr
    shard_1 = next(line for line in status.stdout.splitlines() if "1-of-2" in line)
    assert "stale" in shard_1 and f"pid {holder.pid}" in shard_1, status.stdout
    # Relaunched as 3 ranks under (fake) srun: shards of 3 now, each skips what is done.
    outs = finish(fake_srun(3, manifest, tmp_path, step="1"))
    assert_same_pairs(store, reference)
    generated = sum(int(o.split(" generated,")[0].rsplit(", ", 1)[1]) for o in outs
                    if " generated," in o)
    done_before = open_store(store).scan("responses").filter(
        pl.col("origin") == "policy").collect().height - generated
    assert done_before >= 4 and generated <= 12 - 4, "only what was missing is generated"


@pytest.mark.slow
def test_a_rank_that_fails_to_start_fails_the_launch_loudly(tmp_path, tiny_lm, tiny_rm):
    manifest = write_manifest(tmp_path, tiny_lm, tiny_rm)
    env = child_env(tmp_path, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")
    proc = subprocess.run(
        [sys.executable, "-m", "selm_data.cli", "build", "--iter", "1", "--manifest",
         str(manifest), "--policy", str(tmp_path / "no-such-model")],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2
    assert "rank 1 of 2 (shard 1-of-2, host" in proc.stderr, proc.stderr
    assert "rerun the same command" in proc.stderr
    record = (tmp_path / "store" / "_builds" / "iter=1" / "shard=1-of-2.json").read_text()
    assert "no-such-model" in record


@pytest.mark.slow
def test_eval_under_a_launcher_splits_the_questions_and_writes_the_files_once(tmp_path, tiny_lm,
                                                                            tiny_rm):
    """2 ranks answer MT-Bench's first 5 questions (3 and 2 of them, both turns each) and
    rank 0 writes the file, equal to one process's answers; each run id answered its share."""
    files = {}
    for k in (1, 2):
        folder = tmp_path / f"ranks-{k}"
        manifest = write_manifest(folder, tiny_lm, tiny_rm)
        procs = [subprocess.Popen(
            [sys.executable, "-m", "selm_data.cli", "eval", "--iter", "0", "--prompts",
             "mt_bench", "--limit", "5", "--manifest", str(manifest)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=child_env(folder, **({} if k == 1 else {
                "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                "TORCHELASTIC_RUN_ID": "eval-launch"})))
            for r in range(k)]
        out = "".join(finish(procs))
        assert out.count("wrote ") == 2, out  # the answer file and its lineage file, once
        answer_file = folder / "store" / "evals" / "mt_bench" / "model_answer" / "test-base.jsonl"
        files[k] = [{key: v for key, v in json.loads(line).items() if key != "tstamp"}
                    for line in answer_file.read_text().splitlines()]
        answers = open_store(folder / "store").scan("eval_answers").collect()
        assert answers.height == 10
        if k == 2:
            assert "[rank 1/2] shard 1-of-2 done: 2 questions" in out, out
            assert sorted(answers.group_by("run_id").len()["len"].to_list()) == [4, 6]
    assert files[2] == files[1] and len(files[1]) == 5


@pytest.mark.parametrize("args", [["--local_rank=3", "build", "--iter", "1"],
                                  ["--local-rank", "3", "build", "--iter", "1"]])
def test_the_deepspeed_launchers_local_rank_is_taken_out_of_the_arguments(args, monkeypatch):
    """`deepspeed --module selm_data.cli build ...` puts --local_rank before the subcommand;
    both CLIs drop it (no option of theirs takes it) and keep the number in LOCAL_RANK."""
    from selm_data.generation.launcher import without_local_rank

    monkeypatch.setenv("LOCAL_RANK", "")  # recorded, so the value set below is undone after
    monkeypatch.delenv("LOCAL_RANK")
    assert without_local_rank(args) == ["build", "--iter", "1"]
    assert os.environ["LOCAL_RANK"] == "3"


def test_shards_are_balanced_and_partition_the_portion():
    """k ranks finish together only if their shards are the same size: sizes differ by at most
    one, the shards cover the portion exactly once, and each keeps source order."""
    portion = [f"p{i}" for i in range(1021)]
    for k in (1, 2, 3, 8):
        shards = [Shard(i, k).take(portion) for i in range(k)]
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1, (k, sizes)
        assert sorted(p for s in shards for p in s) == sorted(portion)
        assert all(s == sorted(s, key=portion.index) for s in shards)


def test_status_counts_each_shard_as_the_build_cut_it(tmp_path):
    """`selm-data status` finds a shard's prompts from the stored source rows, as `take` cut
    them: shard 0 of 3, built alone, shows its 4 of the portion's 12 prompts and 4 pairs.
    A builder that recorded no manifest (a library call) leaves the counts unknown."""
    d = manifest_dict(tmp_path, tmp_path / "unused-lm", tmp_path / "unused-rm")
    d["iterations"] = [{"pairs": "original", "loss": "dpo", "alpha": 0.0}, {}]
    m = Manifest.model_validate(d)
    store = open_store(m.store, create=True, run=m.run_info("pytest"))  # as the CLI opens it
    build(m, 1, store, shard=Shard(0, 3))
    build(m, 1, open_store(m.store, run=RunInfo.new("pytest")), shard=Shard(1, 3))
    progress = shard_progress(store)
    assert progress.select("iteration", "shard", "state", "prompts", "pairs").rows() == [
        (1, "0-of-3", "released", 4, 4), (1, "1-of-3", "released", None, None)]


@pytest.mark.slow
def test_ranks_build_into_an_object_store(tmp_path, s3_uri):
    """Under a launcher the ranks meet only in the store, and an s3:// store is enough: each
    rank's record goes there, and rank 0 prints one merged report read from it."""
    d = manifest_dict(tmp_path, tmp_path / "unused-lm", tmp_path / "unused-rm")
    d["store"] = s3_uri
    d["iterations"] = [{"pairs": "original", "loss": "dpo", "alpha": 0.0}, {}]
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump(d))
    procs = [subprocess.Popen(
        [sys.executable, "-m", "selm_data.cli", "build", "--iter", "1", "--manifest",
         str(manifest)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=child_env(tmp_path, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                      TORCHELASTIC_RUN_ID="s3-launch"))
        for r in range(2)]
    out = "".join(finish(procs))
    assert out.count("shard all 2 (merged)") == 1, out
    store = open_store(s3_uri)
    assert store.scan("pairs").collect().height == 12
    assert verify(store) == []
    records = sorted(store.fs.get_file_info(pafs.FileSelector("_builds/iter=1")),
                     key=lambda info: info.path)
    assert [info.base_name for info in records] == ["shard=0-of-2.json", "shard=1-of-2.json"]
