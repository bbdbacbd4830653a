"""What a snapshot is made of, summarised for its card and `selm_lineage.json` (`Lineage`).

Sources and their licenses, the policies and sampling that generated its responses, the
rankers, the runs and their manifests (secrets masked: `scrub`, `redact`), and statistics. A
function of the store alone (no clock, no host), so two renderings of one snapshot are equal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import polars as pl

from selm_data.errors import SelmError
from selm_data.manifest import BUNDLED_DATA
from selm_data.publish.snapshot import POLICY_RULE, check_snapshot, local_folder, snapshot_row
from selm_data.sources.dataset import builder_of
from selm_data.store.store import Store, package_version

LINEAGE_FILE = "selm_lineage.json"
LINEAGE_FORMAT = 1


# Licenses of the sources selm knows; any other source's license is "unknown" unless given.
# The bundled file is a slice of UltraFeedback (see selm_data/data/README.md).
_UF = ("mit", "UltraFeedback (Cui et al. 2023, https://arxiv.org/abs/2310.01377)")
KNOWN_SOURCES: dict[str, tuple[str, str]] = {
    "bundled:ultrafeedback_binarized_1000.jsonl": _UF,
    "HuggingFaceH4/ultrafeedback_binarized": _UF,
    "openbmb/UltraFeedback": _UF,
    "Anthropic/hh-rlhf": ("mit", "HH-RLHF (Bai et al. 2022, https://arxiv.org/abs/2204.05862)"),
}

# What a secret looks like in free text: Hub and OpenAI-style keys, bearer headers, passwords in
# URLs. Masked in everything the card and lineage file show, whatever the field.
_SECRET_TEXT = (
    re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"),
)
# Manifest keys whose values are secrets themselves (`api_key_env` holds a variable's name).
_SECRET_KEY = re.compile(r"(?i)^(.*[_-])?(token|secret|password|passwd|api[_-]?key|auth)$")
MASK = "***"

POLICY_IDS = ("policy_pair_id", "policy_chosen_id", "policy_rejected_id")


@dataclass(frozen=True)
class SourceUse:
    """A source dataset the snapshot's prompts came from."""

    source: str  # Hub id, `bundled:<file>`, or a local file's name
    revision: str | None
    split: str | None
    prompts: int
    license: str  # a Hub license id, or "unknown"
    origin: str | None  # what the data is, when selm knows the source


@dataclass(frozen=True)
class PolicyUse:
    """A policy that generated y_ref, with how it sampled."""

    policy: str
    fingerprint: str | None
    backend: str | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    max_tokens: int | None
    seeded: bool  # per-request seeds (sampling), or none (greedy or unseeded)
    responses: int


@dataclass(frozen=True)
class RankerUse:
    ranker: str
    version: str | None
    rankings: int


@dataclass(frozen=True)
class RunUse:
    """A run that wrote rows of the snapshot (or exported it), as the `runs` table holds it."""

    run_id: str
    command: str
    manifest_hash: str | None
    selm_version: str
    created_at: str


@dataclass(frozen=True)
class ManifestUse:
    manifest_hash: str | None
    run_ids: list[str]
    manifest: dict[str, Any]  # secrets masked


@dataclass(frozen=True)
class Statistics:
    rows: int
    prompts: int
    ties: int
    # min, p25, median, p75, max, mean of chosen minus rejected score (linear interpolation)
    margin: dict[str, float | None]
    ref_chosen: int  # pairs whose chosen response is y_ref, the policy's own
    ref_rejected: int
    chosen_origins: dict[str, int]
    rejected_origins: dict[str, int]


@dataclass(frozen=True)
class PolicyPairStatistics:
    """SAIL's policy pairs of a snapshot (rows whose policy pair is present)."""

    rows: int
    ties: int  # the ranker scored the two samples equal
    swapped: int  # the ranker preferred y_1 to y_0
    margin: dict[str, float | None]  # as Statistics.margin, of the ranker's order


@dataclass(frozen=True)
class Lineage:
    """Everything the card states, as `selm_lineage.json` holds it."""

    format: int
    snapshot: str
    snapshot_id: str
    iteration: int
    content_hash: str
    files: list[str]
    columns: list[str]
    table_versions: dict[str, int]
    filters: dict[str, Any]
    rules: list[str]
    sources: list[SourceUse]
    policies: list[PolicyUse]
    rankers: list[RankerUse]
    export_run_id: str
    runs: list[RunUse]
    manifests: list[ManifestUse]
    statistics: Statistics
    policy_pair: PolicyPairStatistics | None  # None: no SAIL policy pair in the snapshot
    layout: str  # the snapshot's columns: ultrafeedback or trl (see snapshot.py)
    license: str
    exported_with: str  # selm version that wrote the snapshot
    card_by: str  # selm version that wrote the card

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"


def snapshot_lineage(store: Store, name: str, *, license: str | None = None) -> Lineage:
    """The lineage of snapshot `name`, read at the table versions the snapshot recorded.

    `license` overrides the license inherited from the source (a Hub license id).

    Raises:
        SelmError: no snapshot of that name (the message lists the known ones), or its files
            no longer match its content hash.
    """
    row = snapshot_row(store, name)
    problems = check_snapshot(store, row)
    if problems:
        raise SelmError("; ".join(problems) + ". Push refuses a snapshot whose files changed.")
    folder = local_folder(store, row)  # a cached copy for an object-store store
    meta = json.loads((folder / "snapshot.json").read_text(encoding="utf-8"))
    versions = {v["table"]: v["version"] for v in row["table_versions"]}
    policy_pair = bool(meta.get("policy_pair", False))
    pairs = pl.scan_parquet([str(folder / f) for f in meta["files"]]).select(
        "pair_id", "prompt_id", "ranking_id", "chosen_id", "rejected_id", "ref_id", "rule",
        "margin", "is_tie", "chosen_origin", "rejected_origin",
        *((*POLICY_IDS, "score_policy_chosen", "score_policy_rejected", "policy_is_tie",
           "policy_swapped") if policy_pair else ()),
    ).collect()

    def scan(table: str) -> pl.LazyFrame:
        return store.scan(table, version=versions[table]) if table in versions else \
            store.scan(table)

    sources = _sources(scan("prompts"), pairs)
    run_ids = _run_ids(scan, pairs) | {row["run_id"]}
    runs, manifests = _runs(store, run_ids)
    inherited = {s.license for s in sources}
    return Lineage(
        format=LINEAGE_FORMAT,
        snapshot=row["name"],
        snapshot_id=row["snapshot_id"],
        iteration=row["iteration"],
        content_hash=row["content_hash"],
        files=list(meta["files"]),
        columns=list(meta.get("columns", [])),
        layout=meta.get("layout", "ultrafeedback"),  # snapshots before layouts: ultrafeedback
        table_versions=versions,
        filters=json.loads(row["filters"] or "{}"),
        rules=sorted({*pairs["rule"].unique().to_list(),
                      *([POLICY_RULE] if policy_pair else [])}),
        sources=sources,
        policies=_policies(scan("responses"), pairs),
        rankers=_rankers(scan("judgments"), pairs),
        export_run_id=row["run_id"],
        runs=runs,
        manifests=manifests,
        statistics=_statistics(pairs),
        policy_pair=_policy_statistics(pairs) if policy_pair else None,
        license=license or (inherited.pop() if len(inherited) == 1 else "unknown"),
        exported_with=str(meta.get("selm_version", "unknown")),
        card_by=package_version(),
    )


def _source_name(source: str) -> str:
    """A Hub id as it is; a bundled file as `bundled:<file>`; another file by its name only
    (an absolute path says where the builder's home is, which a public card need not)."""
    path = Path(source)
    if path.parent.name == BUNDLED_DATA.name and path.parent.parent.name == "selm_data" \
            and (BUNDLED_DATA / path.name).is_file():
        return f"bundled:{path.name}"
    if path.is_absolute() or builder_of(path):
        return path.name
    return source


def _known(name: str) -> tuple[str, str | None]:
    """The license and origin of a source selm knows, also of a Hub source's config or folder
    (`Anthropic/hh-rlhf/harmless-base`, `HuggingFaceH4/ultrafeedback_binarized:default`)."""
    hub_id = "/".join(name.split(":")[0].split("/")[:2])
    return KNOWN_SOURCES.get(name) or KNOWN_SOURCES.get(hub_id) or ("unknown", None)


def _sources(prompts: pl.LazyFrame, pairs: pl.DataFrame) -> list[SourceUse]:
    used = (
        prompts.filter(pl.col("prompt_id").is_in(pairs["prompt_id"].unique().implode()))
        .unique("prompt_id")
        .group_by("source", "source_revision", "source_split")
        .agg(pl.len().alias("prompts"))
        .sort("source", "source_revision", "source_split", nulls_last=True)
        .collect()
    )
    out = []
    for r in used.iter_rows(named=True):
        name = _source_name(r["source"])
        license, origin = _known(name)
        out.append(SourceUse(name, r["source_revision"], r["source_split"], r["prompts"],
                             license, origin))
    return out


def _response_ids(pairs: pl.DataFrame) -> pl.Series:
    """Every response a snapshot's rows name: the pair's, y_ref, and SAIL's two samples."""
    columns = [c for c in ("ref_id", "chosen_id", "rejected_id", *POLICY_IDS[1:])
               if c in pairs.columns]
    return pl.concat([pairs[c] for c in columns]).drop_nulls().unique()


def _policies(responses: pl.LazyFrame, pairs: pl.DataFrame) -> list[PolicyUse]:
    ids = _response_ids(pairs)
    sampling = pl.col("sampling").struct
    used = (
        responses.filter(pl.col("response_id").is_in(ids.unique().implode())
                         & (pl.col("origin") == "policy"))
        .select(
            pl.col("policy").fill_null("unknown"), "policy_fingerprint", "backend",
            sampling.field("temperature"), sampling.field("top_p"), sampling.field("top_k"),
            sampling.field("max_tokens"), sampling.field("seed").is_not_null().alias("seeded"),
        )
        .group_by(pl.all())
        .agg(pl.len().alias("responses"))
        .sort(pl.all())
        .collect()
    )
    return [PolicyUse(r["policy"], r["policy_fingerprint"], r["backend"], r["temperature"],
                      r["top_p"], r["top_k"], r["max_tokens"], r["seeded"], r["responses"])
            for r in used.iter_rows(named=True)]


def _rankers(judgments: pl.LazyFrame, pairs: pl.DataFrame) -> list[RankerUse]:
    used = (
        judgments.filter(pl.col("ranking_id").is_in(pairs["ranking_id"].unique().implode()))
        .group_by("ranker", "ranker_version")
        .agg(pl.col("ranking_id").n_unique().alias("rankings"))
        .sort("ranker", "ranker_version", nulls_last=True)
        .collect()
    )
    return [RankerUse(r["ranker"], r["ranker_version"], r["rankings"])
            for r in used.iter_rows(named=True)]


def _run_ids(scan: Any, pairs: pl.DataFrame) -> set[str]:
    """Runs that wrote the snapshot's pairs, their responses, rankings and prompts."""
    pair_ids = pairs["pair_id"]
    if "policy_pair_id" in pairs.columns:
        pair_ids = pl.concat([pair_ids, pairs["policy_pair_id"].drop_nulls()])
    wanted = {
        "pairs": ("pair_id", pair_ids),
        "responses": ("response_id", _response_ids(pairs)),
        "judgments": ("ranking_id", pairs["ranking_id"].unique()),
        "prompts": ("prompt_id", pairs["prompt_id"].unique()),
    }
    ids: set[str] = set()
    for table, (column, values) in wanted.items():
        found = scan(table).filter(pl.col(column).is_in(values.implode())) \
            .select(pl.col("run_id").unique()).collect()
        ids.update(found["run_id"].to_list())
    return ids


def _runs(store: Store, run_ids: set[str]) -> tuple[list[RunUse], list[ManifestUse]]:
    rows = (
        store.scan("runs").filter(pl.col("run_id").is_in(sorted(run_ids)))
        .sort("created_at", "run_id").collect()
    )
    runs, manifests = [], {}
    for r in rows.iter_rows(named=True):
        runs.append(RunUse(r["run_id"], scrub(r["command"]), r["manifest_hash"],
                           r["package_version"], r["created_at"].isoformat()))
        if r["manifest"]:
            key = r["manifest_hash"] or r["manifest"]
            if key not in manifests:
                manifests[key] = ManifestUse(r["manifest_hash"], [],
                                             redact(json.loads(r["manifest"])))
            manifests[key].run_ids.append(r["run_id"])
    return runs, list(manifests.values())


def _margin(values: pl.Series) -> dict[str, float | None]:
    """min, p25, median, p75, max, mean (linear interpolation); None where there is none."""
    margin = values.drop_nulls()

    def q(p: float) -> float | None:
        return margin.quantile(p, interpolation="linear") if margin.len() else None

    def stat(value: Any) -> float | None:  # a Float64 column's min, max and mean are floats
        return cast("float | None", value) if margin.len() else None

    return {"min": stat(margin.min()), "p25": q(0.25), "median": q(0.5), "p75": q(0.75),
            "max": stat(margin.max()), "mean": stat(margin.mean())}


def _policy_statistics(pairs: pl.DataFrame) -> PolicyPairStatistics:
    present = pairs.filter(pl.col("policy_pair_id").is_not_null())
    return PolicyPairStatistics(
        rows=present.height,
        ties=int(present["policy_is_tie"].sum()),
        swapped=int(present["policy_swapped"].sum()),
        margin=_margin(present["score_policy_chosen"] - present["score_policy_rejected"]),
    )


def _statistics(pairs: pl.DataFrame) -> Statistics:
    def counts(column: str) -> dict[str, int]:
        c = pairs[column].fill_null("unknown").value_counts(sort=True, name="n")
        return dict(sorted(zip(c[column].to_list(), c["n"].to_list(), strict=True)))

    return Statistics(
        rows=pairs.height,
        prompts=pairs["prompt_id"].n_unique(),
        ties=int(pairs["is_tie"].sum()),
        margin=_margin(pairs["margin"]),
        ref_chosen=int((pairs["chosen_origin"] == "policy").sum()),
        ref_rejected=int((pairs["rejected_origin"] == "policy").sum()),
        chosen_origins=counts("chosen_origin"),
        rejected_origins=counts("rejected_origin"),
    )


# --- secrets ----------------------------------------------------------------------------------


def scrub(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with the given secrets and anything shaped like a key or token masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    for pattern in _SECRET_TEXT:
        text = pattern.sub(MASK, text)
    return text


def redact(value: Any) -> Any:
    """A copy of a manifest (or any JSON value) with secret-named fields and secret-looking
    strings masked. Manifests hold only the names of key variables; this is the second lock."""
    if isinstance(value, Mapping):
        return {k: MASK if _SECRET_KEY.match(str(k)) and isinstance(v, str) and v
                else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return scrub(value)
    return value


__all__ = ["LINEAGE_FILE", "Lineage", "redact", "scrub", "snapshot_lineage"]
