"""The typed views of the bodies the controller reads name the fields the CRD defines."""

from __future__ import annotations

from typing import Any

from tests.support.crd import load_crd

from imagestream.controller.bodies import (
    Condition,
    Progress,
    StreamStatus,
    spec_generation,
    stream_status_of,
)


def status_schema() -> dict[str, Any]:
    schema: dict[str, Any] = load_crd().schema["properties"]["status"]
    return schema


def test_the_status_view_has_the_fields_of_the_crds_status() -> None:
    """A field renamed or added in the CRD is renamed or added in the view too."""
    schema = status_schema()["properties"]
    assert set(StreamStatus.__annotations__) == set(schema)
    assert set(Progress.__annotations__) == set(schema["progress"]["properties"])
    assert set(Condition.__annotations__) == set(schema["conditions"]["items"]["properties"])


def test_spec_generation_discounts_the_bump_of_a_deletion() -> None:
    """A real API server adds 1 to metadata.generation when it sets deletionTimestamp."""
    meta = {"name": "a", "generation": 3}
    assert spec_generation({"metadata": meta}) == 3
    deleting = {"metadata": {**meta, "deletionTimestamp": "2026-01-01T00:00:00Z"}}
    assert spec_generation(deleting) == 2
    assert spec_generation({"metadata": {}}) == 1
    assert stream_status_of({"status": None}) == {}
