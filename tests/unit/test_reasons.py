"""The reasons vocabulary: one enum, documented in docs/reasons.md, used by every layer."""

from __future__ import annotations

import re
from pathlib import Path

from imagestream.errors import Cancelled, IntegrityError, SourceError, TargetError, UsageError
from imagestream.reasons import Reason

REASONS_DOC = Path(__file__).resolve().parents[2] / "docs" / "reasons.md"


def _troubleshooting_rows() -> dict[str, str]:
    section = REASONS_DOC.read_text().split("## Reasons", 1)[1].split("\n## ", 1)[0]
    return {
        match.group(1): match.group(2)
        for match in re.finditer(r"^\| `(\w+)` \|\s*([^|]*?)\s*\|", section, flags=re.M)
    }


def test_the_docs_list_every_reason_and_nothing_else() -> None:
    rows = _troubleshooting_rows()
    assert set(rows) == {reason.value for reason in Reason}


def test_documented_exit_codes_match_the_error_families() -> None:
    rows = _troubleshooting_rows()
    for family in (UsageError, SourceError, IntegrityError, TargetError, Cancelled):
        assert rows[family.default_reason].strip() == str(family.exit_code)


def test_values_are_unique_and_read_as_plain_strings() -> None:
    values = [reason.value for reason in Reason]
    assert len(values) == len(set(values))
    assert f"{Reason.HASH_MISMATCH}" == "HashMismatch"
