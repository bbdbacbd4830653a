"""Push a snapshot to the Hugging Face Hub as a dataset repo whose card states its lineage.

A pushed repo holds exactly these files, which `repo_files` builds:

    data/train-0000i-of-0000n.parquet   the snapshot's shards, byte for byte
    README.md                           the dataset card: YAML metadata (configs and splits,
                                        license, task categories, tags, size), then what the
                                        data is, how it was made, its lineage, the manifest
                                        and statistics
    selm_lineage.json                   the lineage, machine-readable (`Lineage`)

`dry_run` writes them to a folder (which `datasets.load_dataset(folder)` loads); `push` creates
the repo (private unless asked otherwise) and commits them in one commit. The card and the
lineage file are a function of the store alone (no clock, no host), so a dry run and a push of
the same snapshot write the same bytes. The card's license is the source's when selm knows it
(`KNOWN_SOURCES`: the bundled UltraFeedback slice and UltraFeedback on the Hub are MIT), else
`unknown`, which the card says to check; `license=` overrides it.

The token is the `token` argument or huggingface_hub's own (HF_TOKEN, then the saved login). It
goes only into the Authorization header: never into the store, a file, a log line or an error
message (errors from the Hub are re-raised with it masked).

Push writes nothing to the store: it reads the snapshot at the table versions the snapshot
recorded, so it runs on a read-only copy of a store, and the token has no way in. The Hub commit
is the record of a push: its message names the snapshot and its content hash, which the store's
`snapshots` table matches back to the rows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from selm_data.errors import SelmError
from selm_data.manifest import BUNDLED_DATA
from selm_data.snapshot import POLICY_RULE, check_snapshot, snapshot_row
from selm_data.store import Store, package_version

LINEAGE_FILE = "selm_lineage.json"
CARD_FILE = "README.md"
LINEAGE_FORMAT = 1
SELM_PAPER = "https://arxiv.org/abs/2405.19332"
SAIL_PAPER = "https://arxiv.org/abs/2406.15567"

# Licenses of the sources selm knows; any other source's license is "unknown" unless given.
# The bundled file is a slice of UltraFeedback (see selm_data/data/README.md).
_UF = ("mit", "UltraFeedback (Cui et al. 2023, https://arxiv.org/abs/2310.01377)")
KNOWN_SOURCES: dict[str, tuple[str, str]] = {
    "bundled:ultrafeedback_binarized_1000.jsonl": _UF,
    "HuggingFaceH4/ultrafeedback_binarized": _UF,
    "openbmb/UltraFeedback": _UF,
}

# The Hub's size_categories, by upper bound of the row count.
_SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
          (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
          (1_000_000_000, "100M<n<1B"))

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
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

COLUMNS = {
    "prompt": "the last user turn, as text",
    "prompt_id": "the prompt's id in the store",
    "chosen": "the conversation ending in the chosen response (messages)",
    "rejected": "the conversation ending in the rejected response",
    "messages": "same as `chosen` (the layout alignment-handbook recipes read)",
    "score_chosen": "the ranker's score of the chosen response",
    "score_rejected": "the ranker's score of the rejected response",
    "reference": "the conversation ending in the policy's own response y_ref (SELM's term)",
    "score_reference": "the ranker's score of y_ref",
    "margin": "score_chosen - score_rejected",
    "is_tie": "the ranker could not tell chosen from rejected",
    "iteration": "the SELM iteration",
    "rule": "the pairing rule that made the pair",
    "chosen_origin": "which candidate won: policy (y_ref), dataset_chosen or dataset_rejected",
    "rejected_origin": "which candidate lost",
    "pair_id": "the pair's id in the store",
    "ranking_id": "the ranking's id in the store",
    "chosen_id": "the chosen response's id in the store",
    "rejected_id": "the rejected response's id in the store",
    "ref_id": "y_ref's id in the store",
    # SAIL's policy pair (pairing rule `sail`): two seeded samples y_0, y_1 of the policy
    "policy_chosen": "the conversation ending in the policy sample the ranker scored higher "
                     "(y_0 on a tie); the same message format as `chosen`",
    "policy_rejected": "the conversation ending in the other policy sample",
    "score_policy_chosen": "the ranker's score of `policy_chosen`",
    "score_policy_rejected": "the ranker's score of `policy_rejected`",
    "policy_is_tie": "the ranker scored both samples equal (the order is then y_0, y_1)",
    "policy_swapped": "true when `policy_chosen` is sample y_1: swap the two back to get the "
                      "samples in their drawn order (y_0, y_1), unordered by the ranker",
    "policy_pair_id": "the policy pair's id in the store",
    "policy_chosen_id": "`policy_chosen`'s response id in the store",
    "policy_rejected_id": "`policy_rejected`'s response id in the store",
}
# What the shared columns mean in a SAIL snapshot, where they differ from COLUMNS.
SAIL_COLUMNS = {
    "reference": "null: SAIL has no y_ref (SELM's term)",
    "score_reference": "null",
    "ref_id": "null",
    "iteration": "the iteration",
    "rule": "`sail_dataset`: the row's pair is the dataset's (its policy pair is `sail_policy`)",
    "chosen_origin": "dataset_chosen: the dataset's chosen response",
    "rejected_origin": "dataset_rejected: the dataset's rejected response",
    "margin": "score_chosen - score_rejected: negative where the ranker disagrees with the "
              "dataset's label",
}
POLICY_IDS = ("policy_pair_id", "policy_chosen_id", "policy_rejected_id")
# Which columns each route of SAIL's trainer reads (Ding et al. 2024; design.md section 2).
SAIL_ROUTES = (
    ("DPO", "`chosen`, `rejected`: the dataset's pair"),
    ("SAIL-DP", "`chosen`, `rejected`; the trainer relabels by the policy's own preference"),
    ("SAIL-PP", "`policy_chosen`, `policy_rejected` with `policy_swapped` undone (y_0, y_1); "
                "the trainer orders them by the policy's own preference"),
    ("SAIL-PR", "`policy_chosen`, `policy_rejected`: ordered by the ranker"),
)


# --- lineage ----------------------------------------------------------------------------------


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
    folder = store.root / row["path"]
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
    if path.is_absolute() or path.suffix in (".jsonl", ".json", ".parquet"):
        return path.name
    return source


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
        license, origin = KNOWN_SOURCES.get(name, ("unknown", None))
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

    return {"min": margin.min() if margin.len() else None, "p25": q(0.25),
            "median": q(0.5), "p75": q(0.75), "max": margin.max() if margin.len() else None,
            "mean": margin.mean() if margin.len() else None}


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


# --- the card ---------------------------------------------------------------------------------


def size_category(rows: int) -> str:
    for bound, label in _SIZES:
        if rows < bound:
            return label
    return "1B<n<10B"


def card_metadata(lineage: Lineage) -> dict[str, Any]:
    """The card's YAML front matter: what the Hub and `datasets` read."""
    sail = lineage.policy_pair is not None
    return {
        "pretty_name": f"{'SAIL' if sail else 'SELM'} iteration {lineage.iteration} "
                       f"preference pairs ({lineage.snapshot})",
        "license": lineage.license,
        "task_categories": ["text-generation"],
        "tags": ["preference", "dpo", "sail" if sail else "selm", "iterative-alignment",
                 "synthetic"],
        "size_categories": [size_category(lineage.statistics.rows)],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": "data/train-*"}]}],
    }


def _cell(value: Any) -> str:
    text = "—" if value is None or value == "" else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def render_card(lineage: Lineage, *, repo_id: str | None = None) -> str:
    """README.md: YAML metadata, then the data, how it was made, lineage, manifest, statistics."""
    s = lineage.statistics
    meta = yaml.safe_dump(card_metadata(lineage), sort_keys=False, allow_unicode=True)
    sources = ", ".join(f"`{u.source}`" for u in lineage.sources) or "—"
    load_id = repo_id or "ORG/NAME"
    sail = lineage.policy_pair is not None
    meanings = {**COLUMNS, **SAIL_COLUMNS} if sail else COLUMNS
    y_ref_rows = [] if sail else [
        ("y_ref chosen", f"{s.ref_chosen} ({_share(s.ref_chosen, s.rows)})"),
        ("y_ref rejected", f"{s.ref_rejected} ({_share(s.ref_rejected, s.rows)})")]
    parts = [
        f"---\n{meta}---\n",
        *(_sail_intro(lineage, sources) if sail else [
            f"# SELM iteration {lineage.iteration} preference pairs: `{lineage.snapshot}`\n",
            f"{s.rows} preference pairs for iteration {lineage.iteration} of SELM "
            f"([Self-Exploring Language Models]({SELM_PAPER}), Zhang et al. 2024), built with "
            f"[selm](https://pypi.org/project/selm/) from {sources}. For each prompt the policy "
            "answered (y_ref), a ranker scored {y_ref, the dataset's chosen, the dataset's "
            "rejected}, and a pairing rule kept a chosen and a rejected response. The "
            "`reference` column keeps y_ref for SELM's optimism term.\n"]),
        "```python\nfrom datasets import load_dataset\n\n"
        f'pairs = load_dataset("{load_id}", split="train")\n```\n',
        "## Columns\n",
        _table(["column", "meaning"], [(f"`{c}`", meanings.get(c, "")) for c in lineage.columns])
        + "\n",
        "## How it was made\n",
        *_made(lineage),
        "## Statistics\n",
        _table(["", "value"], [
            ("pairs", s.rows), ("prompts", s.prompts), ("ties (`is_tie`)", s.ties),
            *y_ref_rows,
            *((f"chosen from {k}", n) for k, n in s.chosen_origins.items()),
            *((f"rejected from {k}", n) for k, n in s.rejected_origins.items()),
        ]) + "\n",
        "Margin (chosen minus rejected score):\n",
        _table(list(s.margin), [[_num(v) for v in s.margin.values()]]) + "\n",
        *_policy_statistics_section(lineage.policy_pair),
        "## Lineage\n",
        *_lineage_section(lineage),
        "## Manifest\n",
        *_manifest_section(lineage),
        "## License\n",
        _license_text(lineage),
        "## Citation\n",
        *([SAIL_CITATION] if sail else []),
        "```bibtex\n@article{zhang2024selm,\n  title={Self-Exploring Language Models: Active "
        "Preference Elicitation for Online Alignment},\n  author={Zhang, Shenao and Yu, "
        "Donghan and Sharma, Hiteshi and Zhong, Han and Liu, Zhihan and Yang, Ziyi and Wang, "
        "Shuohang and Hassan, Hany and Wang, Zhaoran},\n  journal={arXiv preprint "
        "arXiv:2405.19332},\n  year={2024}\n}\n```\n",
    ]
    return "\n".join(parts)


SAIL_CITATION = (
    "```bibtex\n@article{ding2024sail,\n  title={SAIL: Self-Improving Efficient Online "
    "Alignment of Large Language Models},\n  author={Ding, Mucong and Chakraborty, Souradip "
    "and Agrawal, Vibhu and Che, Zora and Koppel, Alec and Wang, Mengdi and Bedi, Amrit and "
    "Huang, Furong},\n  journal={arXiv preprint arXiv:2406.15567},\n  year={2024}\n}\n```\n")


def _sail_intro(lineage: Lineage, sources: str) -> list[str]:
    """What a SAIL snapshot holds, and which columns each of SAIL's routes trains on."""
    return [
        f"# SAIL iteration {lineage.iteration} preference pairs: `{lineage.snapshot}`\n",
        f"{lineage.statistics.rows} prompts for iteration {lineage.iteration} of SAIL "
        f"([Self-Improving Efficient Online Alignment]({SAIL_PAPER}), Ding et al. 2024), built "
        f"with [selm](https://pypi.org/project/selm/) from {sources}. For each prompt the policy "
        "drew two seeded samples y_0 and y_1, and a ranker scored {y_0, y_1, the dataset's "
        "chosen, the dataset's rejected}. Each row holds two pairs: the dataset's pair as the "
        "dataset labelled it (`chosen`, `rejected`; the ranker's scores beside it, so its "
        "`margin` is negative where the ranker disagrees), and the policy pair "
        "(`policy_chosen`, `policy_rejected`) in the ranker's order. The export filters chose "
        "rows by the dataset pair; a tied policy pair is kept and flagged `policy_is_tie`. "
        "One snapshot serves every route of SAIL's trainer:\n",
        _table(["route", "reads"], SAIL_ROUTES) + "\n",
    ]


def _policy_statistics_section(stats: PolicyPairStatistics | None) -> list[str]:
    if stats is None:
        return []
    return [
        "SAIL's policy pairs (`policy_chosen` over `policy_rejected`):\n",
        _table(["", "value"], [
            ("policy pairs", stats.rows), ("ties (`policy_is_tie`)", stats.ties),
            ("ranker preferred y_1 (`policy_swapped`)",
             f"{stats.swapped} ({_share(stats.swapped, stats.rows)})"),
        ]) + "\n",
        "Policy pair margin (`score_policy_chosen - score_policy_rejected`):\n",
        _table(list(stats.margin), [[_num(v) for v in stats.margin.values()]]) + "\n",
    ]


def _share(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "—"


def _made(lineage: Lineage) -> list[str]:
    sail = lineage.policy_pair is not None
    policies = _table(
        ["policy", "fingerprint", "backend", "temperature", "top_p", "top_k", "max_tokens",
         "per-request seeds", "samples (y_0, y_1)" if sail else "y_ref responses"],
        [(f"`{p.policy}`", p.fingerprint, p.backend, p.temperature, p.top_p, p.top_k,
          p.max_tokens, "yes" if p.seeded else "no", p.responses) for p in lineage.policies])
    rankers = _table(["ranker", "version", "rankings"],
                     [(f"`{r.ranker}`", r.version, r.rankings) for r in lineage.rankers])
    if not lineage.policies:
        policies = "none: no pair holds a policy response (the dataset's own pairs)"
    if not lineage.rankers:
        rankers = "none recorded"
    filters = ", ".join(f"{k}={v}" for k, v in lineage.filters.items()) or "none"
    if sail:
        return [
            "**Policy** (drew the samples y_0, y_1):\n", policies + "\n",
            "**Ranker** (scored the four candidates of each prompt):\n", rankers + "\n",
            f"**Pairing rule**: {', '.join(f'`{r}`' for r in lineage.rules)} (`sail_dataset`: "
            "the dataset's chosen over its rejected; `sail_policy`: the higher-scored sample "
            f"over the other, y_0 on a tie). **Export filters**: {filters}.\n",
        ]
    return [
        "**Policy** (generated y_ref):\n", policies + "\n",
        "**Ranker** (scored the three candidates of each prompt):\n", rankers + "\n",
        f"**Pairing rule**: {', '.join(f'`{r}`' for r in lineage.rules)} (`best_worst`: the "
        "best and worst of the three by rank, ties broken so y_ref wins; `replace`: SELM "
        f"Appendix C). **Export filters**: {filters}.\n",
    ]


_POLICY_IDS_TEXT = ", " + ", ".join(f"`{c}`" for c in POLICY_IDS)


def _lineage_section(lineage: Lineage) -> list[str]:
    sources = _table(["source", "revision", "split", "prompts", "license"],
                     [(f"`{u.source}`", u.revision, u.split, u.prompts, u.license)
                      for u in lineage.sources])
    versions = _table(["table", "version"], sorted(lineage.table_versions.items()))
    runs = _table(["run", "command", "manifest", "selm"],
                  [(f"`{r.run_id}`", f"`{r.command}`", r.manifest_hash, r.selm_version)
                   for r in lineage.runs])
    return [
        f"Snapshot `{lineage.snapshot}` (id `{lineage.snapshot_id}`), content hash "
        f"`{lineage.content_hash}` (sha256 over the shards' names and sha256s), exported by "
        f"selm {lineage.exported_with} in run `{lineage.export_run_id}`. Every row keeps its "
        "store ids (`pair_id`, `prompt_id`, `ranking_id`, `chosen_id`, `rejected_id`, "
        f"`ref_id`{_POLICY_IDS_TEXT if lineage.policy_pair else ''}); `{LINEAGE_FILE}` holds "
        "this section machine-readable.\n",
        "**Source dataset**:\n", sources + "\n",
        "**Store table versions read**:\n", versions + "\n",
        "**Runs that wrote these rows**:\n", runs + "\n",
    ]


def _manifest_section(lineage: Lineage) -> list[str]:
    if not lineage.manifests:
        return ["No run that wrote these rows recorded a manifest (the store was written "
                "through the library, not a `selm-data` command).\n"]
    out = []
    for m in lineage.manifests:
        text = yaml.safe_dump(m.manifest, sort_keys=False, allow_unicode=True)
        out.append(f"Manifest `{m.manifest_hash}` (runs {', '.join(m.run_ids)}); secrets "
                   "are never stored, and anything shaped like one is masked:\n")
        out.append(f"```yaml\n{text}```\n")
    return out


def _license_text(lineage: Lineage) -> str:
    known = [u for u in lineage.sources if u.origin]
    lines = []
    if lineage.license == "unknown":
        lines.append("`unknown`: selm could not tell the license of the source dataset "
                     f"({', '.join(f'`{u.source}`' for u in lineage.sources) or 'none'}). "
                     "Check it, and set the card's `license` before sharing this data.")
    elif all(u.license == lineage.license for u in lineage.sources) and lineage.sources:
        lines.append(f"`{lineage.license}`, inherited from the source dataset.")
    else:
        lines.append(f"`{lineage.license}`, as given by the pusher.")
    lines += [f"The prompts and the dataset's responses are rows of {u.origin}, "
              f"{u.license} license." for u in known]
    samples = "y_0, y_1" if lineage.policy_pair else "y_ref"
    lines.append(f"The policy's responses ({samples}) were generated by the model(s) above; "
                 "their terms of use may apply to generated text.")
    return " ".join(lines) + "\n"


# --- the files --------------------------------------------------------------------------------


def repo_files(store: Store, name: str, *, repo_id: str | None = None,
               license: str | None = None,
               secrets: Iterable[str | None] = ()) -> dict[str, bytes | Path]:
    """Exactly the files of the dataset repo: path in the repo -> bytes or a local file.

    `secrets` are masked in the card and lineage file should they appear anywhere in the store.
    """
    lineage = snapshot_lineage(store, name, license=license)
    folder = store.root / snapshot_row(store, name)["path"]
    secrets = tuple(secrets)
    files: dict[str, bytes | Path] = {rel: folder / rel for rel in lineage.files}
    files[CARD_FILE] = scrub(render_card(lineage, repo_id=repo_id), secrets).encode("utf-8")
    files[LINEAGE_FILE] = scrub(lineage.to_json(), secrets).encode("utf-8")
    return files


def dry_run(store: Store, name: str, directory: str | Path, *, repo_id: str | None = None,
            license: str | None = None) -> list[Path]:
    """Write the files `push` would commit into `directory` (new or empty); returns them.

    Raises:
        SelmError: `directory` holds files already, or the snapshot is unknown or modified.
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise SelmError(f"--dry-run {directory}: give a new or empty folder, so that it holds "
                        "exactly the files a push would commit")
    files = repo_files(store, name, repo_id=repo_id, license=license,
                       secrets=_environment_tokens())
    written = []
    for rel, content in files.items():
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            shutil.copyfile(content, target)  # the bytes only: exports are read-only
        written.append(target)
    return written


def _environment_tokens() -> list[str | None]:
    return [os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]


# --- the push ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    repo_url: str
    commit_url: str
    commit_oid: str
    private: bool | None  # the repo's visibility (None: an existing repo that did not say)
    created: bool  # the repo was made by this push
    files: list[str]


def push(store: Store, name: str, repo_id: str, *, private: bool = True,
         token: str | None = None, revision: str | None = None,
         commit_message: str | None = None, license: str | None = None,
         endpoint: str | None = None) -> PushResult:
    """Create the dataset repo `repo_id` (private unless `private=False`) and commit the
    snapshot's shards, card and lineage file in one commit.

    `token` defaults to huggingface_hub's (HF_TOKEN, then the saved login); `endpoint` to
    huggingface_hub's (HF_ENDPOINT, then huggingface.co). An existing repo is pushed to as it
    is, except that a private push into an existing public repo is refused: pushing there would
    publish what was meant to stay private.

    Raises:
        SelmError: a bad repo id, no token, an unknown or modified snapshot, a public repo
            where a private one was asked for, or any error from the Hub (token masked).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    if not _REPO_ID.fullmatch(repo_id):
        raise SelmError(f"--repo-id {repo_id!r}: give ORG/NAME (letters, digits, '.', '_', "
                        "'-'), e.g. my-org/selm-iter2")
    try:
        token = token or get_token()
    except Exception as e:  # e.g. a failed OIDC exchange; its text is not shown
        raise SelmError(f"could not read the Hugging Face token ({type(e).__name__}): set "
                        "HF_TOKEN or run `hf auth login`") from None
    if not token:
        raise SelmError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (the token "
                        "is read from there and never written anywhere by selm)")
    files = repo_files(store, name, repo_id=repo_id, license=license, secrets=[token])
    lineage = json.loads(files[LINEAGE_FILE])
    message = commit_message or (
        f"SELM snapshot {lineage['snapshot']}: iteration {lineage['iteration']}, "
        f"{lineage['statistics']['rows']} pairs, content {lineage['content_hash'][:12]}")
    description = (f"Pushed by selm {package_version()}. Snapshot content hash "
                   f"{lineage['content_hash']}; lineage in {LINEAGE_FILE}.")
    api = HfApi(endpoint=endpoint, token=token)
    failure: SelmError
    try:
        repo_url, created, visibility = _ensure_repo(api, repo_id, private)
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=(
            content if isinstance(content, bytes) else str(content)))
            for rel, content in files.items()]
        info = api.create_commit(repo_id, operations, repo_type="dataset", revision=revision,
                                 commit_message=scrub(message, [token]),
                                 commit_description=description)
    except SelmError as e:
        failure = SelmError(scrub(str(e), [token]))
    except Exception as e:  # the Hub's boundary: HTTP, network and protocol errors alike
        failure = _hub_error(e, name, repo_id, token)
    else:
        return PushResult(repo_id, repo_url, info.commit_url, info.oid, visibility, created,
                          list(files))
    # Raised here, outside the except block, so the Hub's exception (whose text may echo the
    # Authorization header) is neither the cause nor the context of what the user sees.
    raise failure


def _ensure_repo(api: Any, repo_id: str, private: bool) -> tuple[str, bool, bool | None]:
    """Create the repo, or check that a private push does not land in an existing public one.
    Returns the repo's URL, whether this call created it, and whether it is private."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return str(api.create_repo(repo_id, repo_type="dataset", private=private)), True, private
    except HfHubHTTPError as e:
        if _status(e) not in (403, 409):  # 403: may exist, but the token cannot create repos
            raise
        try:
            info = api.dataset_info(repo_id)
        except HfHubHTTPError:
            raise e from None
    if private and info.private is False:
        raise SelmError(f"the dataset repo {repo_id} exists and is public, and this push is "
                        "private: pass --public to push into it, or make it private on the Hub "
                        "first")
    return f"{api.endpoint}/datasets/{repo_id}", False, info.private


def _status(error: BaseException) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


_HINTS = {
    401: "the Hub refused the token: set HF_TOKEN or run `hf auth login` with a valid token",
    403: "the token cannot write there: use a token with write access to the namespace",
    404: "the namespace or repo was not found: check --repo-id and that the token can see it",
}


def _hub_error(error: Exception, name: str, repo_id: str, token: str) -> SelmError:
    status = _status(error)
    hint = _HINTS.get(status or 0, "check the network, HF_ENDPOINT and the repo id, and push "
                      "again (a commit is all or nothing)")
    detail = scrub(f"{type(error).__name__}: {error}", [token])
    return SelmError(f"pushing snapshot {name} to {repo_id} failed: {detail}. {hint}")


__all__ = [
    "Lineage",
    "PushResult",
    "dry_run",
    "push",
    "redact",
    "render_card",
    "repo_files",
    "scrub",
    "snapshot_lineage",
]
