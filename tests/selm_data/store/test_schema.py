"""Row identity: exactly the declared fields define a row's id (style habit 7)."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest

from helpers import chain_rows
from selm_data.store.schema import RESPONSES, RUNS, TABLES, conform, content_id, row_id

FILL: dict[str, Any] = {"run_id": "run-a", "created_at": datetime(2026, 1, 1, tzinfo=UTC)}


def sample_row(table: str) -> dict[str, Any]:
    if table == "runs":
        return {"run_id": "r1", "command": "c", "package_version": "0.1"}
    row = dict(chain_rows(iteration=1, n_prompts=1)[table][0])
    row.pop(TABLES[table].id_column, None)
    return row


def changed(value: Any, type_: pa.DataType) -> Any:
    """A different value of the same Arrow type."""
    if pa.types.is_string(type_):
        return (value or "") + "-changed"
    if pa.types.is_integer(type_):
        return (value or 0) + 1
    if pa.types.is_floating(type_):
        return (value or 0.0) + 0.5
    if pa.types.is_boolean(type_):
        return not value
    if pa.types.is_timestamp(type_):
        return (value or FILL["created_at"]) + timedelta(days=1)
    if pa.types.is_list(type_):
        item = {f.name: changed(None, f.type) for f in type_.value_type}
        return [*(value or []), item]
    if pa.types.is_struct(type_):
        base = dict(value or {})
        first = type_.field(0)
        return {**base, first.name: changed(base.get(first.name), first.type)}
    raise AssertionError(f"no change rule for {type_}")


def stored_id(table: str, row: dict[str, Any], fill: dict[str, Any] = FILL) -> str:
    spec = TABLES[table]
    return conform(spec, [row], fill).column(spec.id_column)[0].as_py()


@pytest.mark.parametrize("table", [t for t, s in TABLES.items() if s.id_fields])
def test_id_changes_with_identity_fields_only(table):
    spec = TABLES[table]
    row = sample_row(table)
    base = stored_id(table, row)
    assert base == row_id(spec, row)
    for field in spec.schema:
        if field.name == spec.id_column:
            continue
        edited = {**row, field.name: changed(row.get(field.name), field.type)}
        if field.name in spec.id_fields:
            assert stored_id(table, edited) != base, f"{table}.{field.name} must change the id"
        else:
            assert stored_id(table, edited) == base, f"{table}.{field.name} must not"
    other_run = {"run_id": "run-b", "created_at": datetime(2027, 1, 1, tzinfo=UTC)}
    assert stored_id(table, row, other_run) == base, "a rerun gives the same ids"


def test_writer_given_ids_are_kept():
    row = sample_row("runs")
    assert conform(RUNS, [row], FILL).column("run_id")[0].as_py() == "r1"


def test_id_is_sha256_of_canonical_json_written_out_by_hand():
    messages = [{"role": "user", "content": "héllo"}]
    expected_text = '{"fields":{"messages":[{"content":"héllo","role":"user"}]},"kind":"prompts"}'
    expected = hashlib.sha256(expected_text.encode("utf-8")).hexdigest()[:32]
    assert content_id("prompts", {"messages": messages}) == expected
    assert row_id(TABLES["prompts"], {"messages": messages}) == expected
    assert json.loads(expected_text)["fields"]["messages"] == messages


def test_values_are_typed_by_the_schema_before_hashing():
    row = sample_row("responses")
    as_ints = {**row, "sampling": {"top_p": 1, "temperature": 0, "top_k": -1, "max_tokens": 64}}
    as_floats = {**row, "sampling": {"temperature": 0.0, "top_p": 1.0, "top_k": -1,
                                     "max_tokens": 64, "seed": None}}
    assert row_id(RESPONSES, as_ints) == row_id(RESPONSES, as_floats)
    assert row_id(RESPONSES, as_ints) == stored_id("responses", as_floats)


def test_every_reference_names_a_real_column():
    for spec in TABLES.values():
        for ref in spec.references:
            assert ref.column in spec.schema.names, (spec.name, ref)
            assert ref.target in TABLES[ref.table].schema.names, (spec.name, ref)
        for column in (*spec.id_fields, *spec.partition_by, *spec.stats_columns):
            assert column in spec.schema.names, (spec.name, column)
