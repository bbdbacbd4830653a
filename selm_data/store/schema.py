"""The store's tables: their Arrow schemas, row identity and the references between them.

This module is the one home of the data model. Every row carries a content-derived id: the hash
of canonical JSON over exactly the fields that define the row (`TableSpec.id_fields`), so
re-running a step produces the same ids and the store can drop what it already holds.
Bookkeeping columns (`run_id`, `created_at`) and outputs (a response's text, a score) are
deliberately not part of identity: a rerun with the same inputs is the same row.

Lineage chain, upstream to downstream:
    prompts -> responses (policy, fingerprint, sampling, seed) -> judgments (ranker, version)
    -> pairs (rule) -> snapshots (table versions) -> checkpoints -> next iteration's responses
Evaluation, beside it:
    checkpoints (or the base policy) -> eval_answers (prompt set + hash, question, turn,
    sampling) -> eval_comparisons (two policies' answers, ranker, version)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, TypeAlias

import pyarrow as pa

from selm_data.errors import StoreError

ID_HEX_CHARS = 32  # 128 bits of sha256: collisions are out of reach at any dataset size.

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SAMPLING = pa.struct(
    [
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("top_k", pa.int32()),
        ("max_tokens", pa.int32()),
        ("seed", pa.int64()),
    ]
)
TABLE_VERSIONS = pa.list_(pa.struct([("table", pa.string()), ("version", pa.int64())]))
TIMESTAMP = pa.timestamp("us", tz="UTC")

# Values of the small closed vocabularies stored as strings.
RESPONSE_ORIGINS = ("policy", "dataset_chosen", "dataset_rejected")
RESPONSE_STATUSES = ("ok", "failed")


@dataclass(frozen=True)
class Reference:
    """`column` of this table must name an existing `table.target` value (when not null)."""

    column: str
    table: str
    target: str


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: pa.Schema
    id_column: str
    # Fields hashed into the id; empty means the writer supplies the id (e.g. a random run id).
    id_fields: tuple[str, ...]
    partition_by: tuple[str, ...] = ()
    references: tuple[Reference, ...] = ()
    # Columns with min/max statistics in the Delta log: short strings and integers. Long text
    # columns are left out because their statistics cost write time and never prune a scan.
    stats_columns: tuple[str, ...] = ()
    description: str = ""

    @property
    def auto_columns(self) -> tuple[str, ...]:
        """Columns the store fills in when a batch leaves them out."""
        auto = ["run_id", "created_at"]
        if self.id_fields:
            auto.append(self.id_column)
        return tuple(auto)


def _field(name: str, type_: pa.DataType, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable)


def _bookkeeping() -> list[pa.Field]:
    return [_field("run_id", pa.string(), False), _field("created_at", TIMESTAMP, False)]


def _runs_ref() -> Reference:
    return Reference("run_id", "runs", "run_id")


RUNS = TableSpec(
    name="runs",
    description="One row per command that wrote to the store, with its whole manifest.",
    schema=pa.schema(
        [
            _field("run_id", pa.string(), False),
            _field("command", pa.string(), False),
            _field("manifest_hash", pa.string()),
            _field("manifest", pa.string()),  # the validated manifest as canonical JSON
            _field("package_version", pa.string(), False),
            _field("host", pa.string()),
            _field("created_at", TIMESTAMP, False),
        ]
    ),
    id_column="run_id",
    id_fields=(),
    stats_columns=("run_id",),
)

PROMPTS = TableSpec(
    name="prompts",
    description="Prompts of the source dataset, as chat messages, with the row they came from.",
    schema=pa.schema(
        [
            _field("prompt_id", pa.string(), False),
            _field("iteration", pa.int32(), False),
            _field("messages", MESSAGES, False),
            _field("source", pa.string(), False),  # Hub id or file path
            _field("source_revision", pa.string()),
            _field("source_split", pa.string()),
            _field("source_row", pa.int64()),
            *_bookkeeping(),
        ]
    ),
    id_column="prompt_id",
    id_fields=("messages",),  # identical prompts are one prompt
    partition_by=("iteration",),
    references=(_runs_ref(),),
    stats_columns=("prompt_id", "iteration", "source_row", "run_id"),
)

RESPONSES = TableSpec(
    name="responses",
    description=(
        "Every candidate response: the policy's generations and the dataset's original "
        "chosen and rejected responses, with how each was produced."
    ),
    schema=pa.schema(
        [
            _field("response_id", pa.string(), False),
            _field("prompt_id", pa.string(), False),
            _field("iteration", pa.int32(), False),
            _field("origin", pa.string(), False),  # one of RESPONSE_ORIGINS
            _field("sample_index", pa.int32(), False),  # k-th sample of n for one request
            _field("status", pa.string(), False),  # one of RESPONSE_STATUSES
            _field("error", pa.string()),  # why a failed generation failed
            _field("text", pa.string()),
            _field("policy", pa.string()),  # model id or checkpoint path
            _field("policy_fingerprint", pa.string()),
            _field("backend", pa.string()),
            _field("sampling", SAMPLING),
            _field("prompt_tokens", pa.int32()),
            _field("completion_tokens", pa.int32()),
            _field("finish_reason", pa.string()),
            _field("source_score", pa.float64()),  # the dataset's own score, for dataset origins
            *_bookkeeping(),
        ]
    ),
    id_column="response_id",
    # The request, not the generated text, defines a response: regenerating after a crash maps
    # to the same id. `status` is part of identity so a retry that succeeds is kept beside the
    # recorded failure instead of being dropped as a duplicate.
    id_fields=("prompt_id", "origin", "policy_fingerprint", "sampling", "sample_index", "status"),
    partition_by=("iteration",),
    references=(Reference("prompt_id", "prompts", "prompt_id"), _runs_ref()),
    stats_columns=(
        "response_id", "prompt_id", "iteration", "origin", "status", "run_id",
    ),
)

JUDGMENTS = TableSpec(
    name="judgments",
    description=(
        "One row per candidate of a ranking: its score and rank (1 is best). The candidates "
        "of one ranking share a ranking_id."
    ),
    schema=pa.schema(
        [
            _field("judgment_id", pa.string(), False),
            _field("ranking_id", pa.string(), False),
            _field("prompt_id", pa.string(), False),
            _field("iteration", pa.int32(), False),
            _field("response_id", pa.string(), False),
            _field("position", pa.int32(), False),  # index in the list given to the ranker
            _field("n_candidates", pa.int32(), False),
            _field("score", pa.float64()),
            _field("rank", pa.int32()),
            _field("ranker", pa.string(), False),
            _field("ranker_version", pa.string()),
            *_bookkeeping(),
        ]
    ),
    id_column="judgment_id",
    id_fields=("ranking_id", "response_id"),
    partition_by=("iteration",),
    references=(
        Reference("prompt_id", "prompts", "prompt_id"),
        Reference("response_id", "responses", "response_id"),
        _runs_ref(),
    ),
    stats_columns=(
        "judgment_id", "ranking_id", "prompt_id", "iteration", "response_id", "run_id",
    ),
)

PAIRS = TableSpec(
    name="pairs",
    description=(
        "The preference pairs a rule made from a ranking: the training data. SELM's rules make "
        "one pair a ranking; SAIL's makes two, `sail_dataset` and `sail_policy`."
    ),
    schema=pa.schema(
        [
            _field("pair_id", pa.string(), False),
            _field("prompt_id", pa.string(), False),
            _field("iteration", pa.int32(), False),
            _field("ranking_id", pa.string(), False),
            # best_worst | replace | original (the dataset's own pairs, `pairs: original`) |
            # sail_dataset (y_w over y_l, scored by the ranker) | sail_policy (two samples)
            _field("rule", pa.string(), False),
            _field("chosen_id", pa.string(), False),
            _field("rejected_id", pa.string(), False),
            # the policy's own response (y_ref), for SELM's term; null for original and SAIL
            _field("ref_id", pa.string()),
            _field("chosen_origin", pa.string()),  # which candidate won: policy, dataset_chosen..
            _field("rejected_origin", pa.string()),
            _field("chosen_score", pa.float64()),
            _field("rejected_score", pa.float64()),
            _field("margin", pa.float64()),
            _field("is_tie", pa.bool_(), False),
            *_bookkeeping(),
        ]
    ),
    id_column="pair_id",
    id_fields=("ranking_id", "rule", "chosen_id", "rejected_id"),
    partition_by=("iteration",),
    references=(
        Reference("prompt_id", "prompts", "prompt_id"),
        Reference("ranking_id", "judgments", "ranking_id"),
        Reference("chosen_id", "responses", "response_id"),
        Reference("rejected_id", "responses", "response_id"),
        Reference("ref_id", "responses", "response_id"),
        _runs_ref(),
    ),
    stats_columns=("pair_id", "prompt_id", "iteration", "ranking_id", "run_id"),
)

QUARANTINE = TableSpec(
    name="quarantine",
    description="Source rows that cannot be used, with the reason: counted, never dropped.",
    schema=pa.schema(
        [
            _field("quarantine_id", pa.string(), False),
            _field("source", pa.string(), False),
            _field("source_revision", pa.string()),
            _field("source_split", pa.string()),
            _field("source_row", pa.int64(), False),
            _field("reason", pa.string(), False),
            _field("detail", pa.string()),
            *_bookkeeping(),
        ]
    ),
    id_column="quarantine_id",
    id_fields=("source", "source_revision", "source_split", "source_row", "reason"),
    references=(_runs_ref(),),
    stats_columns=("quarantine_id", "source_row", "reason", "run_id"),
)

SNAPSHOTS = TableSpec(
    name="snapshots",
    description="Immutable, named exports of an iteration's training data.",
    schema=pa.schema(
        [
            _field("snapshot_id", pa.string(), False),
            _field("name", pa.string(), False),
            _field("iteration", pa.int32()),
            _field("path", pa.string(), False),
            _field("format", pa.string(), False),
            _field("row_count", pa.int64(), False),
            _field("content_hash", pa.string(), False),
            _field("table_versions", TABLE_VERSIONS, False),  # exact store versions read
            _field("filters", pa.string()),  # canonical JSON of the export filters
            *_bookkeeping(),
        ]
    ),
    id_column="snapshot_id",
    id_fields=("name", "content_hash"),
    references=(_runs_ref(),),
    stats_columns=("snapshot_id", "name", "iteration", "run_id"),
)

CHECKPOINTS = TableSpec(
    name="checkpoints",
    description="Policies trained on snapshots; the policy of the next iteration's build.",
    schema=pa.schema(
        [
            _field("checkpoint_id", pa.string(), False),
            _field("iteration", pa.int32()),
            _field("path", pa.string(), False),
            _field("fingerprint", pa.string(), False),
            _field("snapshot_id", pa.string()),
            _field("parent_id", pa.string()),  # the checkpoint this one was trained from
            _field("base_model", pa.string()),
            _field("loss", pa.string()),
            _field("config", pa.string()),  # canonical JSON of the training config
            *_bookkeeping(),
        ]
    ),
    id_column="checkpoint_id",
    id_fields=("path", "fingerprint"),
    references=(
        Reference("snapshot_id", "snapshots", "snapshot_id"),
        Reference("parent_id", "checkpoints", "checkpoint_id"),
        _runs_ref(),
    ),
    stats_columns=("checkpoint_id", "iteration", "snapshot_id", "run_id"),
)

EVAL_ANSWERS = TableSpec(
    name="eval_answers",
    description=(
        "A policy's answer to one turn of an evaluation question (AlpacaEval, MT-Bench or a "
        "prompt file), with the prompt set's hash, the policy checkpoint and the sampling."
    ),
    schema=pa.schema(
        [
            _field("answer_id", pa.string(), False),
            _field("prompt_set", pa.string(), False),  # alpaca_eval, mt_bench or a file's name
            _field("prompt_set_hash", pa.string(), False),  # content of the whole set
            _field("question_id", pa.string(), False),  # the set's own id, as text
            _field("category", pa.string()),  # MT-Bench category or AlpacaEval dataset
            _field("turn", pa.int32(), False),  # 1, 2, ...
            # What the policy was given: for turn 2, [user 1, its own answer 1, user 2].
            _field("messages", MESSAGES, False),
            _field("iteration", pa.int32()),  # the checkpoint's iteration; 0: the base policy
            _field("policy", pa.string(), False),  # model id or checkpoint path
            _field("policy_fingerprint", pa.string(), False),
            _field("checkpoint_id", pa.string()),  # when the policy is a registered checkpoint
            _field("backend", pa.string()),
            _field("sampling", SAMPLING, False),
            _field("status", pa.string(), False),  # one of RESPONSE_STATUSES
            _field("error", pa.string()),
            _field("text", pa.string()),
            _field("prompt_tokens", pa.int32()),
            _field("completion_tokens", pa.int32()),
            _field("finish_reason", pa.string()),
            *_bookkeeping(),
        ]
    ),
    id_column="answer_id",
    # The request defines an answer, as for `responses`; `messages` makes a second turn's id
    # depend on the first answer it follows, and `status` keeps a retry beside its failure.
    id_fields=("prompt_set_hash", "question_id", "turn", "messages", "policy_fingerprint",
               "sampling", "status"),
    references=(Reference("checkpoint_id", "checkpoints", "checkpoint_id"), _runs_ref()),
    stats_columns=(
        "answer_id", "prompt_set", "question_id", "turn", "iteration", "policy_fingerprint",
        "status", "run_id",
    ),
)

EVAL_COMPARISONS = TableSpec(
    name="eval_comparisons",
    description=(
        "A ranker's comparison of two policies' answers to one evaluation question, scored in "
        "both orders so that position bias cancels."
    ),
    schema=pa.schema(
        [
            _field("comparison_id", pa.string(), False),
            _field("prompt_set", pa.string(), False),
            _field("prompt_set_hash", pa.string(), False),
            _field("question_id", pa.string(), False),
            _field("turn", pa.int32(), False),
            # a and b in the order of their answer ids (a < b), whichever was asked first
            _field("answer_a_id", pa.string(), False),
            _field("answer_b_id", pa.string(), False),
            _field("policy_a_fingerprint", pa.string(), False),
            _field("policy_b_fingerprint", pa.string(), False),
            _field("ranker", pa.string(), False),
            _field("ranker_version", pa.string()),
            # the ranker's scores with a's answer first (candidates [a, b]) and b's first
            _field("a_first_score_a", pa.float64(), False),
            _field("a_first_score_b", pa.float64(), False),
            _field("b_first_score_a", pa.float64(), False),
            _field("b_first_score_b", pa.float64(), False),
            _field("margin", pa.float64(), False),  # mean over both orders of score a - b
            _field("win_a", pa.float64(), False),  # 1: a wins (margin > 0), 0.5: tie, 0: b
            _field("chars_a", pa.int64(), False),  # answer lengths, for length control
            _field("chars_b", pa.int64(), False),
            *_bookkeeping(),
        ]
    ),
    id_column="comparison_id",
    id_fields=("answer_a_id", "answer_b_id", "ranker", "ranker_version"),
    references=(
        Reference("answer_a_id", "eval_answers", "answer_id"),
        Reference("answer_b_id", "eval_answers", "answer_id"),
        _runs_ref(),
    ),
    stats_columns=(
        "comparison_id", "prompt_set", "question_id", "policy_a_fingerprint",
        "policy_b_fingerprint", "run_id",
    ),
)

TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in (RUNS, PROMPTS, QUARANTINE, RESPONSES, JUDGMENTS, PAIRS, SNAPSHOTS, CHECKPOINTS,
                 EVAL_ANSWERS, EVAL_COMPARISONS)
}


def table_spec(name: str) -> TableSpec:
    try:
        return TABLES[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}; the store has {', '.join(TABLES)}") from None


# --- identity -----------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot hash a value of type {type(value).__name__}")


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default
    )


def content_id(kind: str, fields: Mapping[str, Any]) -> str:
    """The id of a `kind` of thing defined by `fields` (sha256 of canonical JSON, 128 bits)."""
    payload = canonical_json({"kind": kind, "fields": dict(fields)})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:ID_HEX_CHARS]


def row_ids(spec: TableSpec, table: pa.Table) -> pa.Array:
    """Ids for every row of an Arrow table whose identity columns have the schema's types."""
    assert spec.id_fields, f"{spec.name} ids are given by the writer, not derived"
    columns = [table.column(f).to_pylist() for f in spec.id_fields]
    ids = [
        content_id(spec.name, dict(zip(spec.id_fields, values, strict=True)))
        for values in zip(*columns, strict=True)
    ]
    return pa.array(ids, pa.string())


def row_id(spec: TableSpec, row: Mapping[str, Any]) -> str:
    """The id the store gives `row`: values are first typed by the schema, as on write."""
    columns = {f: _column(spec, f, [row.get(f)]) for f in spec.id_fields}
    return row_ids(spec, pa.table(columns))[0].as_py()


# --- conforming a batch to a table's schema ----------------------------------------------------

# Any: a polars DataFrame (anything with .to_arrow())
Batch: TypeAlias = pa.Table | pa.RecordBatch | Sequence[Mapping[str, Any]] | Any


def _column(spec: TableSpec, name: str, values: list[Any]) -> pa.Array:
    type_ = spec.schema.field(name).type
    try:
        return pa.array(values, type=type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as e:
        raise StoreError(f"{spec.name}.{name}: values do not fit type {type_}: {e}") from e


def _to_arrow(spec: TableSpec, data: Batch) -> pa.Table:
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        return data
    if hasattr(data, "to_arrow"):  # polars DataFrame
        return data.to_arrow()
    rows = list(data)
    if rows and not all(isinstance(r, Mapping) for r in rows):
        raise StoreError(f"{spec.name}: rows must be mappings of column to value")
    keys = sorted({k for r in rows for k in r})
    unknown = [k for k in keys if k not in spec.schema.names]
    if unknown:
        raise StoreError(
            f"{spec.name}: unknown column(s) {unknown}; the table has {spec.schema.names}"
        )
    present = [n for n in spec.schema.names if n in keys]
    return pa.table({n: _column(spec, n, [r.get(n) for r in rows]) for n in present})


def conform(spec: TableSpec, data: Batch, fill: Mapping[str, Any]) -> pa.Table:
    """`data` as a table with exactly `spec`'s schema, or a StoreError that names the column.

    Columns absent from `data` take the scalar in `fill` (bookkeeping columns) or null; a
    derived id column absent from `data` is computed from the identity fields.
    """
    table = _to_arrow(spec, data)
    unknown = [n for n in table.column_names if n not in spec.schema.names]
    if unknown:
        raise StoreError(
            f"{spec.name}: unknown column(s) {unknown}; the table has {spec.schema.names}"
        )
    n = table.num_rows
    columns: dict[str, pa.Array | pa.ChunkedArray] = {}
    for field in spec.schema:
        if field.name in table.column_names:
            try:
                columns[field.name] = table.column(field.name).cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
                given = table.schema.field(field.name).type
                raise StoreError(
                    f"{spec.name}.{field.name}: cannot convert {given} to {field.type}: {e}"
                ) from e
        elif field.name in fill:
            columns[field.name] = pa.array([fill[field.name]] * n, type=field.type)
        else:
            columns[field.name] = pa.nulls(n, type=field.type)
    if spec.id_fields and spec.id_column not in table.column_names:
        columns[spec.id_column] = row_ids(spec, pa.table(columns))
    out = pa.table(columns)
    for field in spec.schema:
        nulls = out.column(field.name).null_count
        if not field.nullable and nulls:
            raise StoreError(
                f"{spec.name}.{field.name}: {nulls} of {n} rows are null, and this column "
                "is required"
            )
    return out.cast(spec.schema)
