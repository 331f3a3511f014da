"""The project's documentation: self-contained, complete for the API, links that resolve.

docs/api.md must name every field of the CRD's schema (the CRD is the source of truth; a
field added there without a line in the docs fails here). README.md and docs/ may link only
to files inside the repository, and each link must resolve.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "imagestream.dev_imagestreams.yaml"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def field_paths(node: dict[str, Any], path: str = "") -> Iterator[str]:
    for name, sub in node.get("properties", {}).items():
        here = f"{path}.{name}" if path else name
        yield here
        yield from field_paths(sub, here)
        if "items" in sub:
            yield from field_paths(sub["items"], f"{here}[]")


def crd_fields() -> list[str]:
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return [p for p in field_paths(schema) if p.startswith(("spec.", "status."))]


def test_the_api_doc_names_every_crd_field() -> None:
    api = (ROOT / "docs" / "api.md").read_text()
    fields = crd_fields()
    assert len(fields) > 40
    missing = [f for f in fields if f"`{f}`" not in api]
    assert missing == []


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_links_stay_inside_the_repository_and_resolve(document: Path) -> None:
    text = document.read_text()
    assert "../shared" not in text
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        resolved = (document.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{document.name} links outside: {target}"
        assert resolved.exists(), f"{document.name} links to a missing {target}"


def test_the_docs_directory_has_what_the_readme_promises() -> None:
    names = {p.name for p in (ROOT / "docs").iterdir()}
    assert {"architecture.md", "api.md", "reasons.md", "result.schema.json"} <= names
