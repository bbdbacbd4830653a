"""Snapshots: an iteration's pairs frozen as Parquet files that any trainer reads.

`export` reads the pairs of one iteration at the store's current table versions (recorded),
joins the prompt and the three texts, applies the filters, and writes the rows sorted by
`pair_id` under `<store>/exports/<name>/` with a `snapshot.json` beside them. The content hash
is the sha256 over the files' names and sha256s; the same inputs and filters write the same
bytes (with the same pyarrow: another Parquet writer may encode differently), so exporting
again gives the same hash and adds nothing. A name is never reused for other
content, files are made read-only, and `selm-data verify` rehashes them.

On an object-store store the files are written in a local staging folder, hashed, and then
uploaded under `<store>/exports/<name>/`, snapshot.json last; `local_folder` gives readers that
need files on disk (the trainer, push, diff) a hash-checked copy in a local cache.

Two layouts, each with what SELM and lineage need besides (`reference`: y_ref, for the SELM
loss; `score_reference`, `margin`, `is_tie`, and the store ids):

- `ultrafeedback`: the Hub's UltraFeedback-binarized columns (`prompt` as the last
  user turn's text, `prompt_id`, `chosen` and `rejected` as whole conversations, `messages` =
  `chosen`, `score_chosen`, `score_rejected`), which alignment-handbook recipes read.
- `trl` (default): TRL's explicit-prompt conversational preference format (`prompt` = the
  prompt turns, `chosen` / `rejected` / `reference` = the one assistant turn). TRL's
  DPOTrainer (1.16) does not accept the UltraFeedback layout: with a string `prompt` beside
  conversational `chosen`, its data preparation fails (TypeError or AttributeError, by set
  order). `export` prints which trainer reads which layout, with the line that loads it.

An iteration built with `pairing.rule: sail` holds two pairs a prompt (builder). Its snapshot
keeps one row a prompt: the dataset pair (`sail_dataset`) in the usual columns, so every reader
of the other snapshots reads it unchanged, and beside it the policy pair in `POLICY_COLUMNS`
(`policy_chosen` / `policy_rejected` in the layout's message format, their scores and ids,
`policy_is_tie`, and `policy_swapped`: the ranker's order is (y_1, y_0), so undoing the swap
gives the samples in their original order, for SAIL-PP). snapshot.json says `policy_pair: true`.
Other iterations' snapshots have no such columns, so their bytes and hashes are as before. The
filters select rows by the dataset pair (`is_tie`, `margin`); the policy pair is kept as it is,
its ties flagged in `policy_is_tie`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from selm_data.errors import SelmError
from selm_data.store.maintenance import pin_checkpoints
from selm_data.store.progress import steps
from selm_data.store.schema import MESSAGES, canonical_json
from selm_data.store.store import Store, package_version

EXPORTS = "exports"
READS = ("prompts", "responses", "judgments", "pairs")
ROWS_PER_FILE = 250_000
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
Layout = Literal["ultrafeedback", "trl"]
LAYOUTS: tuple[Layout, ...] = ("ultrafeedback", "trl")
# The default is the layout TRL's DPOTrainer reads: most users train with TRL, and on the
# ultrafeedback layout it fails in its data preparation (tried with trl 1.16). selm-train,
# datasets and polars read both.
DEFAULT_LAYOUT: Layout = "trl"
POLICY_RULE = "sail_policy"  # the pairs rule of SAIL's policy pair: a column group, not a row
POLICY_COLUMNS = ("policy_chosen", "policy_rejected", "score_policy_chosen",
                  "score_policy_rejected", "policy_is_tie", "policy_swapped", "policy_pair_id",
                  "policy_chosen_id", "policy_rejected_id")


@dataclass(frozen=True)
class Filters:
    """Which rows an export keeps, judged by the row's (dataset) pair, never the policy pair."""

    drop_ties: bool = False
    min_margin: float | None = None  # keep pairs whose margin is at least this

    def as_json(self) -> str:
        return canonical_json(asdict(self))


@dataclass(frozen=True)
class Snapshot:
    name: str
    iteration: int
    path: Path | str  # a folder, or the URI of the folder in an object-store store
    files: list[str]  # relative to path
    row_count: int
    content_hash: str
    table_versions: dict[str, int]
    filters: Filters
    layout: Layout
    created: bool  # False: the same snapshot existed already
    policy_pair: bool = False  # rows carry SAIL's policy pair (POLICY_COLUMNS)


@dataclass(frozen=True)
class Reader:
    """A trainer or library, whether it reads a snapshot's layout, and the line that loads it
    (or the export that makes a snapshot it reads)."""

    name: str
    reads: bool
    line: str


def readers(snap: Snapshot, store_uri: str) -> list[Reader]:
    """Who reads `snap` and how: what `export` prints, so nobody learns it from a TypeError."""
    data = f"{snap.path}/data/*.parquet"
    load = f'datasets.load_dataset("parquet", data_files="{data}", split="train")'
    other = {"trl": "ultrafeedback", "ultrafeedback": "trl"}[snap.layout]
    again = f"`selm-data export --iter {snap.iteration} --layout {other}`"
    trl, uf = snap.layout == "trl", snap.layout == "ultrafeedback"
    return [
        Reader("datasets / polars", True, f'ds = {load}  or  pl.read_parquet("{data}")'),
        Reader("selm-train", True, f"`selm-train train --snapshot {store_uri}@{snap.name}`"),
        Reader("TRL DPOTrainer", trl,
               "DPOTrainer(model=..., args=DPOConfig(...), train_dataset=ds)" if trl
               else f"reads the trl layout only (on this one its data preparation fails): "
                    f"{again}"),
        Reader("alignment-handbook", uf,
               "ds (the Hub's UltraFeedback-binarized columns its DPO recipes read)" if uf
               else f"its recipes read the ultrafeedback layout: {again}"),
    ]


def _filtered_out(store: Store, iteration: int, filters: Filters) -> str:
    """Why the filters kept nothing: how many pairs are ties and how many have no margin."""
    counts = (store.scan("pairs").filter((pl.col("iteration") == iteration)
                                         & (pl.col("rule") != POLICY_RULE))
              .select(pl.len().alias("pairs"), pl.col("is_tie").sum().alias("ties"),
                      pl.col("margin").is_null().sum().alias("unscored"),
                      pl.col("margin").max().alias("largest"))
              .collect().row(0, named=True))
    top = counts["largest"]
    largest = "" if top is None else f", the largest margin is {top:.4g}"
    flags = " ".join(f for f, on in (("--drop-ties", filters.drop_ties),
                                     (f"--min-margin {filters.min_margin}",
                                      filters.min_margin is not None)) if on)
    return (f"no pair of iteration {iteration} passes {flags}: of its {counts['pairs']} pairs, "
            f"{counts['ties']} are ties, {counts['unscored']} have no score (a dataset without "
            f"score columns){largest}; export without those options or loosen them")


def export(store: Store, iteration: int, *, name: str | None = None,
           filters: Filters = Filters(), layout: Layout = DEFAULT_LAYOUT) -> Snapshot:
    """Export iteration `iteration`'s pairs as a snapshot (see the module docstring).

    Raises:
        SelmError: no pairs (after the filters), a bad name, or a name already used for
            other content.
    """
    if name is not None and not _NAME.fullmatch(name):
        raise SelmError(f"snapshot name {name!r}: use letters, digits, '.', '_' and '-' "
                        "(up to 100), starting with a letter or digit")
    if layout not in LAYOUTS:
        raise SelmError(f"snapshot layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    versions = {t: store.version(t) for t in READS}
    table = snapshot_table(store, iteration, versions, filters, layout)
    if table.num_rows == 0 and filters != Filters():
        raise SelmError(_filtered_out(store, iteration, filters))
    if table.num_rows == 0:
        raise SelmError(f"iteration {iteration} has no pairs; build them first: "
                        f"`selm-data build --iter {iteration}`")
    local = store.location.local
    root = local / EXPORTS if local is not None else Path(tempfile.mkdtemp(prefix="selm-export-"))
    staging = root / f".staging-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        files = _write_files(table, staging)
        content_hash = files_hash(staging, files)
        name = name or f"iter{iteration}-{content_hash[:8]}"
        with store.claim(f"export/{name}"):
            existing = _registered(store, name)
            if existing is not None:
                if existing["content_hash"] != content_hash:
                    raise SelmError(
                        f"snapshot {name!r} exists with other content (hash "
                        f"{existing['content_hash'][:12]}, this export {content_hash[:12]}); "
                        "snapshots are never overwritten: pick another --name")
                return _snapshot(store, existing, created=False)
            meta = {"name": name, "iteration": iteration, "content_hash": content_hash,
                    "row_count": table.num_rows, "table_versions": versions,
                    "filters": asdict(filters), "layout": layout, "files": files,
                    "selm_version": package_version(),
                    "columns": table.schema.names, "policy_pair": has_policy(table)}
            (staging / "snapshot.json").write_text(json.dumps(meta, indent=2) + "\n")
            final = _publish(store, staging, name, files)
            store.append("snapshots", [{
                # relative to the store, so a store folder can move
                "name": name, "iteration": iteration, "path": f"{EXPORTS}/{name}",
                "format": f"parquet:{layout}",
                "row_count": table.num_rows, "content_hash": content_hash,
                "table_versions": [{"table": t, "version": v} for t, v in versions.items()],
                "filters": filters.as_json(),
            }])
            for t, v in versions.items():  # readable at these versions after log cleanup
                pin_checkpoints(store, t, [v])
            return Snapshot(name, iteration, final, files, table.num_rows, content_hash,
                            versions, filters, layout, created=True,
                            policy_pair=has_policy(table))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if local is None:
            shutil.rmtree(root, ignore_errors=True)


def _publish(store: Store, staging: Path, name: str, files: list[str]) -> Path | str:
    """Move the staged files to `exports/<name>/` (a rename on disk; uploads, snapshot.json
    last, on an object store). Files there that no snapshot row names are left by a crash
    between this and the commit of the row, so they are replaced."""
    if store.location.local is not None:
        final = store.location.local / EXPORTS / name
        if final.exists():  # a crash between the move and the commit: never registered
            shutil.rmtree(final)
        _read_only(staging, [*files, "snapshot.json"])
        os.replace(staging, final)
        return final
    folder = f"{EXPORTS}/{name}"
    store.fs.delete_dir_contents(folder, missing_dir_ok=True)
    for rel in [*files, "snapshot.json"]:
        with (staging / rel).open("rb") as src, store.fs.open_output_stream(f"{folder}/{rel}") \
                as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return store.location.join(folder)


def has_policy(table: pa.Table) -> bool:
    """Whether a snapshot's rows carry SAIL's policy pair."""
    return POLICY_COLUMNS[0] in table.column_names


def snapshot_table(store: Store, iteration: int, versions: dict[str, int],
                   filters: Filters, layout: Layout = DEFAULT_LAYOUT) -> pa.Table:
    """The rows of a snapshot, sorted by pair_id, read at exactly `versions`: one a pair, or
    for SAIL one a prompt with its policy pair beside (the module docstring)."""
    def scan(t: str) -> pl.LazyFrame:
        return store.scan(t, version=versions[t])

    every = scan("pairs").filter(pl.col("iteration") == iteration)
    pairs = every.filter(pl.col("rule") != POLICY_RULE)
    policy = every.filter(pl.col("rule") == POLICY_RULE)
    with_policy = policy.select(pl.len()).collect().item() > 0
    if filters.drop_ties:
        pairs = pairs.filter(~pl.col("is_tie"))
    if filters.min_margin is not None:
        pairs = pairs.filter(pl.col("margin") >= filters.min_margin)
    texts = scan("responses").select("response_id", "text")
    ref_scores = scan("judgments").select("ranking_id", "response_id", "score")
    prompts = scan("prompts").select("prompt_id", "messages").unique("prompt_id")

    def turn(text: str) -> pl.Expr:
        return pl.concat_list(pl.col("messages"), pl.struct(
            role=pl.lit("assistant"), content=pl.col(text)))

    joined = (
        pairs.join(prompts, on="prompt_id", how="left")
        .join(texts.rename({"response_id": "chosen_id", "text": "chosen_text"}),
              on="chosen_id", how="left")
        .join(texts.rename({"response_id": "rejected_id", "text": "rejected_text"}),
              on="rejected_id", how="left")
        .join(texts.rename({"response_id": "ref_id", "text": "ref_text"}),
              on="ref_id", how="left")
        .join(ref_scores.rename({"response_id": "ref_id", "score": "score_reference"}),
              on=["ranking_id", "ref_id"], how="left")
    )
    columns = _columns(layout, turn)
    if with_policy:
        joined = _join_policy(joined, policy, scan("responses"))
        columns += _policy_columns(layout, turn)
    frame = (
        joined.with_columns(
            last_user=pl.col("messages").list.eval(
                pl.element().filter(pl.element().struct.field("role") == "user")
            ).list.last().struct.field("content"),
        )
        .select(*columns)
        .sort("pair_id")
        .collect()
    )

    def lost(column: str) -> pl.Expr:  # a response the store does not hold
        return pl.col(column).list.last().struct.field("content").is_null()

    missing = lost("chosen") | lost("rejected") | pl.col("prompt").is_null()
    if with_policy:
        missing |= pl.col("policy_pair_id").is_not_null() & (
            lost("policy_chosen") | lost("policy_rejected"))
    broken = frame.filter(missing).height
    if broken:
        raise SelmError(f"{broken} pairs of iteration {iteration} point at responses "
                        "the store does not hold; run `selm-data verify`")
    table = frame.to_arrow()
    return table.cast(_schema(table.schema))


def _columns(layout: Layout, turn: Any) -> list[pl.Expr | str]:
    if layout == "trl":
        def answer(text: str) -> pl.Expr:
            return pl.concat_list(pl.struct(role=pl.lit("assistant"), content=pl.col(text)))

        head: list[pl.Expr | str] = [
            pl.col("messages").alias("prompt"), "prompt_id",
            answer("chosen_text").alias("chosen"), answer("rejected_text").alias("rejected")]
        reference = pl.when(pl.col("ref_id").is_not_null()).then(answer("ref_text"))
    else:
        head = [pl.col("last_user").alias("prompt"), "prompt_id",
                turn("chosen_text").alias("chosen"), turn("rejected_text").alias("rejected"),
                turn("chosen_text").alias("messages")]
        reference = pl.when(pl.col("ref_id").is_not_null()).then(turn("ref_text"))
    return [
        *head,
        pl.col("chosen_score").alias("score_chosen"),
        pl.col("rejected_score").alias("score_rejected"),
        reference.alias("reference"), "score_reference", "margin", "is_tie", "iteration", "rule",
        "chosen_origin", "rejected_origin", "pair_id", "ranking_id", "chosen_id", "rejected_id",
        "ref_id",
    ]


def _join_policy(frame: pl.LazyFrame, policy: pl.LazyFrame,
                 responses: pl.LazyFrame) -> pl.LazyFrame:
    """SAIL's policy pair beside the dataset pair of the same ranking, with both samples'
    texts and sample indexes (the swap flag compares them)."""
    policy = policy.select(
        "ranking_id", pl.col("pair_id").alias("policy_pair_id"),
        pl.col("chosen_id").alias("policy_chosen_id"),
        pl.col("rejected_id").alias("policy_rejected_id"),
        pl.col("chosen_score").alias("score_policy_chosen"),
        pl.col("rejected_score").alias("score_policy_rejected"),
        pl.col("is_tie").alias("policy_is_tie"))
    samples = responses.select("response_id", "text", "sample_index")
    for role in ("chosen", "rejected"):
        policy = policy.join(samples.rename({
            "response_id": f"policy_{role}_id", "text": f"policy_{role}_text",
            "sample_index": f"policy_{role}_sample"}), on=f"policy_{role}_id", how="left")
    return frame.join(policy, on="ranking_id", how="left")


def _policy_columns(layout: Layout, turn: Any) -> list[pl.Expr | str]:
    """POLICY_COLUMNS, the messages in the layout's format (as `chosen` and `rejected`)."""
    def message(text: str) -> pl.Expr:
        answer = turn(text) if layout == "ultrafeedback" else pl.concat_list(
            pl.struct(role=pl.lit("assistant"), content=pl.col(text)))
        return pl.when(pl.col("policy_pair_id").is_not_null()).then(answer)

    return [
        message("policy_chosen_text").alias("policy_chosen"),
        message("policy_rejected_text").alias("policy_rejected"),
        "score_policy_chosen", "score_policy_rejected", "policy_is_tie",
        (pl.col("policy_chosen_sample") > pl.col("policy_rejected_sample"))
        .alias("policy_swapped"),
        "policy_pair_id", "policy_chosen_id", "policy_rejected_id",
    ]


def _schema(schema: pa.Schema) -> pa.Schema:
    """Plain string and list types (polars writes large/view types) so every reader agrees.
    Every list column of a snapshot is a list of chat messages."""
    fields = []
    for f in schema:
        if pa.types.is_list(f.type) or pa.types.is_large_list(f.type) or \
                pa.types.is_list_view(f.type) or pa.types.is_large_list_view(f.type):
            fields.append(pa.field(f.name, MESSAGES))
        elif pa.types.is_large_string(f.type) or pa.types.is_string_view(f.type):
            fields.append(pa.field(f.name, pa.string()))
        else:
            fields.append(f)
    return pa.schema(fields)


def _write_files(table: pa.Table, folder: Path) -> list[str]:
    """Shards of at most ROWS_PER_FILE rows, one row group each. The table is made one chunk
    first: Parquet pages follow Arrow chunks, and polars chunks its output by thread timing,
    so without it the same rows could write different bytes (and a different hash)."""
    table = table.combine_chunks()
    (folder / "data").mkdir()
    n = max(1, -(-table.num_rows // ROWS_PER_FILE))
    files = []
    with steps("export: writing shards", table.num_rows, unit="pairs") as bar:
        for i in range(n):
            rel = f"data/train-{i:05d}-of-{n:05d}.parquet"
            part = table.slice(i * ROWS_PER_FILE, ROWS_PER_FILE)
            pq.write_table(part, folder / rel, compression="zstd",
                           row_group_size=ROWS_PER_FILE)
            files.append(rel)
            bar.update(part.num_rows)
    return files


def files_hash(folder: Path, files: list[str]) -> str:
    """A snapshot's content hash: sha256 over its files' relative names and sha256s."""
    return hashlib.sha256(canonical_json(
        [[rel, file_sha256(folder / rel)] for rel in files]).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def local_folder(store: Store, row: dict[str, Any]) -> Path:
    """A registered snapshot's folder on this machine: in a local store, where it is; in an
    object store, a copy under the cache ($SELM_CACHE, else ~/.cache/selm/snapshots), keyed by
    content hash and kept only if its files hash right, so a partial download is never used.

    Raises:
        SelmError: the snapshot's files are missing or do not match its hash.
    """
    if store.location.local is not None:
        return store.location.local / row["path"]
    cache = Path(os.environ.get("SELM_CACHE") or Path.home() / ".cache" / "selm") / "snapshots"
    final = cache / row["content_hash"]
    if (final / "snapshot.json").is_file():
        return final
    problems = check_snapshot(store, row)
    if problems:
        raise SelmError("; ".join(problems))
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".partial-{uuid.uuid4().hex}"
    try:
        meta = _read_meta(store, row["path"])
        for rel in [*meta["files"], "snapshot.json"]:
            (partial / rel).parent.mkdir(parents=True, exist_ok=True)
            with store.fs.open_input_stream(f"{row['path']}/{rel}") as src, \
                    (partial / rel).open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        if files_hash(partial, meta["files"]) != row["content_hash"]:
            raise SelmError(f"snapshot {row['name']}: the downloaded files do not match its "
                            "content hash (changed while reading?); run the command again")
        _read_only(partial, [*meta["files"], "snapshot.json"])
        os.replace(partial, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


def _read_meta(store: Store, folder: str) -> dict[str, Any]:
    with store.fs.open_input_stream(f"{folder}/snapshot.json") as f:
        meta: dict[str, Any] = json.loads(f.read().decode("utf-8"))
    return meta


def _fs_files_hash(fs: pafs.FileSystem, folder: str, files: list[str]) -> str:
    """`files_hash` of a folder read through the store's filesystem."""
    def sha(rel: str) -> str:
        digest = hashlib.sha256()
        with fs.open_input_stream(f"{folder}/{rel}") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()
    return hashlib.sha256(canonical_json([[rel, sha(rel)] for rel in files]).encode()).hexdigest()


def _read_only(folder: Path, files: list[str]) -> None:
    for rel in files:
        mode = (folder / rel).stat().st_mode
        (folder / rel).chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _registered(store: Store, name: str) -> dict[str, Any] | None:
    rows = store.scan("snapshots").filter(pl.col("name") == name).collect()
    return rows.row(0, named=True) if rows.height else None


def snapshot_row(store: Store, name: str) -> dict[str, Any]:
    """The registered snapshot `name`, or a SelmError that lists the store's snapshots."""
    row = _registered(store, name)
    if row is None:
        raise SelmError(f"no snapshot named {name!r}; known: {snapshot_names(store)}. Export "
                        f"one with `selm-data export --iter N` (store {store.uri})")
    return row


def snapshot_names(store: Store, limit: int = 20) -> str:
    names = sorted(store.scan("snapshots").select("name").collect()["name"].to_list())
    if not names:
        return "none yet"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _snapshot(store: Store, row: dict[str, Any], *, created: bool) -> Snapshot:
    meta = _read_meta(store, row["path"])
    where: Path | str = (store.location.local / row["path"] if store.location.local is not None
                         else store.location.join(row["path"]))
    return Snapshot(row["name"], row["iteration"], where, meta["files"],
                    row["row_count"], row["content_hash"],
                    {v["table"]: v["version"] for v in row["table_versions"]},
                    Filters(**json.loads(row["filters"])), meta.get("layout", "ultrafeedback"),
                    created=created, policy_pair=bool(meta.get("policy_pair", False)))


def check_snapshot(store: Store, row: dict[str, Any]) -> list[str]:
    """What is wrong with a registered snapshot's files (empty: intact). Reads through the
    store's filesystem, so it checks a local folder and an object-store prefix alike."""
    folder, fs = row["path"], store.fs
    where = store.location.join(folder)
    if fs.get_file_info(f"{folder}/snapshot.json").type != pafs.FileType.File:
        return [f"snapshot {row['name']}: {where}/snapshot.json is missing"]
    files = _read_meta(store, folder)["files"]
    present = {info.path.removeprefix(f"{folder}/")
               for info in fs.get_file_info(pafs.FileSelector(f"{folder}/data", recursive=True,
                                                               allow_not_found=True))
               if info.type == pafs.FileType.File}
    problems = [f"snapshot {row['name']}: {where}/{rel} is missing"
                for rel in files if rel not in present]
    problems += [f"snapshot {row['name']}: unexpected file {rel}"
                 for rel in sorted(present - set(files))]
    if not problems and _fs_files_hash(fs, folder, files) != row["content_hash"]:
        problems.append(f"snapshot {row['name']}: its files no longer match its content hash "
                        f"{row['content_hash'][:12]}: it was modified; export it again under "
                        "a new name")
    return problems
