"""Sources as datasets ship them: compressed files, folders and globs of shards, and Hub repos
laid out as Anthropic/hh-rlhf and HuggingFaceH4/ultrafeedback_binarized are (`data_dir`,
`data_files`, a config). The repos are local folders fed to the same `load_dataset` call a user
makes against the Hub. Expected rows are worked out with plain `json`, not with the code under test.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from selm_data.errors import SelmError
from selm_data.manifest import SourceSpec
from selm_data.sources.dataset import LoadedSource, load_source

SHARED_DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
UF_1000 = SHARED_DATA / "ultrafeedback_binarized_1000.jsonl"

COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
    ".zst": lambda b: zstandard.ZstdCompressor().compress(b)}
TALK = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: "
# HH-RLHF rows: two usable, one repeated prompt and one of each of five quarantine reasons.
HH_ROWS: list[dict[str, Any]] = [
    {"chosen": TALK + "Fine, thanks.", "rejected": TALK + "Go away."},
    {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
    {"chosen": "Just some text.", "rejected": "\n\nHuman: A\n\nAssistant: y"},
    {"chosen": "\n\nHuman: Q\n\nAssistant: yes", "rejected": "\n\nHuman: Q\n\nAssistant: no"},
    {"chosen": "\n\nHuman: A\n\nAssistant: same", "rejected": "\n\nHuman: A\n\nAssistant: same"},
    {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": None},
    {"chosen": TALK + "Good.", "rejected": TALK + "Bad."},
]
HH_EXPECTED = {"examples": [0, 3], "duplicates": 1, "quarantine": [
    (1, "prompts differ"), (2, "unparseable transcript"), (4, "chosen equals rejected"),
    (5, "missing rejected")]}


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _same(a: LoadedSource, b: LoadedSource) -> None:
    assert (a.layout, a.rows_read, a.duplicates) == (b.layout, b.rows_read, b.duplicates)
    assert a.examples == b.examples
    assert a.quarantined == b.quarantined


def _load(**spec: object) -> LoadedSource:
    return load_source(SourceSpec.model_validate(spec))


# --- compressed files -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.bz2", ".jsonl.xz", ".jsonl.zst",
                                    ".json.gz"])
def test_hh_layout_compressed_equals_the_plain_file(tmp_path: Path, suffix: str) -> None:
    plain = tmp_path / "test.jsonl"
    plain.write_bytes(_jsonl(HH_ROWS))
    data = json.dumps(HH_ROWS).encode() if suffix.startswith(".json.") else _jsonl(HH_ROWS)
    packed = tmp_path / f"packed{suffix}"
    packed.write_bytes(COMPRESS[Path(suffix).suffix](data))

    expected, loaded = _load(path=str(plain)), _load(path=str(packed))

    _same(loaded, expected)
    assert loaded.layout == "hh"
    assert [e.source_row for e in loaded.examples] == HH_EXPECTED["examples"]
    assert [(q.source_row, q.reason) for q in loaded.quarantined] == HH_EXPECTED["quarantine"]
    assert loaded.duplicates == HH_EXPECTED["duplicates"]


def test_compressed_parquet_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pairs.parquet.gz"
    path.write_bytes(gzip.compress(b"x"))
    with pytest.raises(SelmError, match=r"'\.parquet\.gz'; supported: jsonl, json or parquet"):
        _load(path=str(path))


# --- shards ---------------------------------------------------------------------------------


def _uf_rows() -> list[dict]:
    """40 real rows of the flat file, with the quarantined rows 306, 478 and 833 and a repeat."""
    raw = [json.loads(line) for line in UF_1000.read_text(encoding="utf-8").splitlines()]
    return [raw[i] for i in (*range(36), 306, 478, 833)] + [raw[3]]


def _uf_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{"prompt": r["prompt"], "chosen": r["chosen"],
                                  "rejected": r["rejected"], **r["metadata"]} for r in rows])


def test_a_folder_of_three_parquet_shards_equals_one_file(tmp_path: Path) -> None:
    rows = _uf_rows()
    pq.write_table(_uf_table(rows), tmp_path / "one.parquet")
    shards = tmp_path / "shards"
    shards.mkdir()
    # Written out of order: the order of the rows is the sorted order of the shards' names.
    for i in (2, 0, 1):
        part = rows[14 * i: 14 * (i + 1)]
        pq.write_table(_uf_table(part), shards / f"train-0000{i}-of-00003.parquet")
    (shards / ".cache").mkdir()  # hidden folders (datasets' own caches) are not shards
    pq.write_table(_uf_table(rows[:2]), shards / ".cache" / "stale.parquet")

    one = _load(path=str(tmp_path / "one.parquet"))
    folder = _load(path=str(shards))
    glob = _load(path=str(shards / "train-*.parquet"))

    assert (one.rows_read, len(one.examples), one.duplicates) == (40, 36, 1)
    assert [q.source_row for q in one.quarantined] == [36, 37, 38]
    _same(folder, one)
    _same(glob, one)
    assert (folder.source, glob.source) == (str(shards), str(shards / "train-*.parquet"))


def test_jsonl_shards_mixed_with_compression(tmp_path: Path) -> None:
    rows = _uf_rows()
    (tmp_path / "all.jsonl").write_bytes(_jsonl(rows))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.jsonl").write_bytes(_jsonl(rows[:20]))
    (tmp_path / "shards" / "b.jsonl.gz").write_bytes(gzip.compress(_jsonl(rows[20:])))
    _same(_load(path=str(tmp_path / "shards")), _load(path=str(tmp_path / "all.jsonl")))


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: None, "folder .* holds no data file"),
    (lambda d: (d / "a.jsonl").write_text("{}\n") and pq.write_table(
        pa.table({"x": [1]}), d / "b.parquet"), "mixes json and parquet files"),
    (lambda d: (d / "a.jsonl").touch(), "is empty"),
])
def test_unusable_folders_say_why(tmp_path: Path, make, message: str) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    make(folder)
    with pytest.raises(SelmError, match=message):
        _load(path=str(folder))


def test_a_glob_matching_nothing(tmp_path: Path) -> None:
    with pytest.raises(SelmError, match=r"no file matches .*\*\.parquet"):
        _load(path=str(tmp_path / "*.parquet"))


# --- Hub repos, as the Hub lays them out ------------------------------------------------------


@pytest.fixture
def hh_repo(tmp_path: Path) -> Path:
    """Anthropic/hh-rlhf: one folder per subset, each with train and test .jsonl.gz."""
    repo = tmp_path / "hh-rlhf"
    for subset, rows in (("harmless-base", HH_ROWS), ("helpful-base", HH_ROWS[:1])):
        (repo / subset).mkdir(parents=True)
        for split, part in (("train", rows), ("test", rows[::-1])):
            (repo / subset / f"{split}.jsonl.gz").write_bytes(gzip.compress(_jsonl(part)))
    (repo / "README.md").write_text("---\nlicense: mit\n---\n# HH-RLHF\n", encoding="utf-8")
    return repo


def test_hub_data_dir_reads_one_subset(hh_repo: Path) -> None:
    loaded = _load(hub=str(hh_repo), data_dir="harmless-base", split="train")
    assert loaded.source == f"{hh_repo}/harmless-base"
    assert loaded.rows_read == len(HH_ROWS)  # not helpful-base's row
    assert [(q.source_row, q.reason) for q in loaded.quarantined] == HH_EXPECTED["quarantine"]

    test = _load(hub=str(hh_repo), data_dir="harmless-base", split="test")
    assert test.split == "test" and test.examples[0].chosen == "Good."  # rows reversed


def test_hub_data_files_pattern_is_read_as_the_split_asked(hh_repo: Path) -> None:
    loaded = _load(hub=str(hh_repo), data_files="helpful-base/test.jsonl.gz", split="test")
    assert (loaded.split, loaded.rows_read) == ("test", 1)


@pytest.fixture
def uf_repo(tmp_path: Path) -> Path:
    """HuggingFaceH4/ultrafeedback_binarized: Parquet shards under data/, named splits declared
    as a `default` config in the card's YAML."""
    repo = tmp_path / "ultrafeedback_binarized"
    (repo / "data").mkdir(parents=True)
    rows = _uf_rows()
    for split, part in (("train_prefs", rows), ("test_prefs", rows[:5])):
        table = pa.Table.from_pylist([{
            "prompt": r["prompt"], "prompt_id": f"id{i}",
            "chosen": [{"role": "user", "content": r["prompt"]},
                       {"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "user", "content": r["prompt"]},
                         {"role": "assistant", "content": r["rejected"]}],
            **r["metadata"]} for i, r in enumerate(part)])
        pq.write_table(table, repo / "data" / f"{split}-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\nlicense: mit\nconfigs:\n- config_name: default\n  data_files:\n"
        "  - split: train_prefs\n    path: data/train_prefs-*\n"
        "  - split: test_prefs\n    path: data/test_prefs-*\n---\n", encoding="utf-8")
    return repo


def test_hub_config_and_named_split(uf_repo: Path) -> None:
    loaded = _load(hub=str(uf_repo), config="default", split="test_prefs")
    assert (loaded.layout, loaded.rows_read, loaded.source) == (
        "ultrafeedback", 5, f"{uf_repo}:default")
    assert [e.source_id for e in loaded.examples] == [f"id{i}" for i in range(5)]
    assert loaded.examples[0].score_chosen is not None

    train = _load(hub=str(uf_repo), split="train_prefs")
    assert (train.rows_read, len(train.examples), train.duplicates) == (40, 36, 1)


def test_an_unknown_config_names_the_fix(uf_repo: Path) -> None:
    with pytest.raises(SelmError, match=r"could not load dataset .*check the id, config"):
        _load(hub=str(uf_repo), config="nope", split="test_prefs")


def test_hub_options_are_for_hub_sources() -> None:
    for key, value in (("data_dir", "harmless-base"), ("config", "default"),
                       ("data_files", ["a.jsonl"])):
        with pytest.raises(ValueError, match=f"{key} applies to a Hub dataset"):
            SourceSpec.model_validate({"path": "x.jsonl", key: value})


def test_the_manifest_page_examples_validate() -> None:
    """docs/manifests.md's source examples are manifests' `source` sections as they stand."""
    import re

    import yaml

    page = (Path(__file__).resolve().parents[3] / "docs" / "manifests.md").read_text("utf-8")
    blocks = re.findall(r"^```yaml\n(.*?)^```", page, re.S | re.M)
    sources = [yaml.safe_load(b)["source"] for b in blocks if b.lstrip().startswith("source:")]
    assert len(sources) == 3
    for source in sources:
        SourceSpec.model_validate(source)
    assert {s.get("data_dir") for s in sources} >= {"harmless-base"}


def test_sources_check_takes_them_too(hh_repo: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """As a new user tries it: the file HH-RLHF ships, then the repo's folder by --data-dir."""
    from cli_inprocess import selm_data

    def check(*args: str) -> str:
        result = selm_data(["sources", "check", *args], cwd=hh_repo, monkeypatch=monkeypatch,
                           capsys=capsys)
        assert result.code == 0, result.err
        cells = {line.split("│")[1].strip(): line.split("│")[2].strip()
                 for line in result.out.splitlines() if line.count("│") == 3}
        return f"{cells['layout']} {cells['rows read']} {cells['usable examples']}"

    assert check("harmless-base/test.jsonl.gz") == "hh 7 2"
    assert check(".", "--data-dir", "harmless-base", "--split", "test") == "hh 7 2"
    assert check(".", "--data-dir", "helpful-base") == "hh 1 1"
    assert check("harmless-base") == "hh 14 2"  # a folder: train and test shards together
