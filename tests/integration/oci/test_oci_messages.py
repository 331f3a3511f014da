"""OCI on a loopback registry: the error says which URL was used (TLS or plain HTTP is guessed
on loopback, so the user is told the guess), with a real `docker-registry` of each kind."""

from __future__ import annotations

from pathlib import Path

from tests.support.cli import run_imagestream
from tests.support.oci_push import LiveRegistry

HASH = "ab" * 48


def unknown_tag(registry: LiveRegistry, tmp_path: Path, *extra: str) -> dict[str, object]:
    reference = registry.reference("os/missing", tag="v9")
    run = run_imagestream(
        "stream", reference, tmp_path / "o.img", "--sha384", HASH, "--progress", "json", *extra
    )
    assert run.code == 3, run.text
    return run.result()


def test_a_plain_http_loopback_registry_is_named_with_http(
    registry: LiveRegistry, tmp_path: Path
) -> None:
    result = unknown_tag(registry, tmp_path)
    assert result["reason"] == "NameUnknown"
    assert f"the registry was reached at http://{registry.address}" in str(result["message"])


def test_a_tls_loopback_registry_is_named_with_https(
    registry_tls: LiveRegistry, tmp_path: Path
) -> None:
    assert registry_tls.ca_file is not None
    result = unknown_tag(registry_tls, tmp_path, "--ca-file", str(registry_tls.ca_file))
    assert result["reason"] == "NameUnknown"
    assert f"the registry was reached at https://{registry_tls.address}" in str(result["message"])
