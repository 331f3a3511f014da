"""`redact_url`: what reaches logs, messages and status keeps the place but never the secrets."""

from __future__ import annotations

import pytest

from imagestream.pipeline.redact import redact_url

SECRETS = ("pa55word", "tok3n", "fr4g", "us3r")


def _assert_no_secret(redacted: str) -> None:
    for secret in SECRETS:
        assert secret not in redacted, redacted
    assert "@" not in redacted, redacted


@pytest.mark.parametrize(
    ("url", "kept"),
    [
        (
            "https://us3r:pa55word@images.example.com:8443/os/v1/disk.img.zst?token=tok3n#fr4g",
            "https://images.example.com:8443/os/v1/disk.img.zst",
        ),
        ("http://us3r@example.com/disk.zst?X-Amz-Signature=tok3n", "http://example.com/disk.zst"),
        ("http://:pa55word@example.com/a", "http://example.com/a"),
        ("http://example.com/a/b%20c.zst#fr4g", "http://example.com/a/b%20c.zst"),
        ("https://us3r:pa55word@example.com", "https://example.com"),
        ("http://us3r:pa55word@10.0.0.7:8080/?tok3n", "http://10.0.0.7:8080/"),
    ],
)
def test_drops_userinfo_query_and_fragment_keeps_host_port_path(url: str, kept: str) -> None:
    redacted = redact_url(url)

    _assert_no_secret(redacted)
    assert redacted.startswith(kept)
    # Whatever marks the removed query, it is no more than a marker.
    assert redacted in (kept, f"{kept}?<redacted>"), redacted


def test_a_removed_query_is_marked_so_the_reader_knows_something_was_there() -> None:
    assert redact_url("http://example.com/a?tok3n") != redact_url("http://example.com/a")
    assert redact_url("http://example.com/a") == "http://example.com/a"


def test_host_is_lowercased_but_path_case_is_kept() -> None:
    assert redact_url("http://US3R:pa55word@Example.COM/Disk.ZST") == "http://example.com/Disk.ZST"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://[::1]:8080/disk.zst", "http://[::1]:8080/disk.zst"),
        ("https://us3r:pa55word@[2001:db8::17]/img?tok3n", "https://[2001:db8::17]/img?<redacted>"),
        ("http://[2001:db8::1]:443/x#fr4g", "http://[2001:db8::1]:443/x"),
        ("http://us3r:pa55word@[fe80::1%25eth0]:80/x", "http://[fe80::1%25eth0]:80/x"),
    ],
)
def test_ipv6_hosts_keep_their_brackets(url: str, expected: str) -> None:
    redacted = redact_url(url)

    _assert_no_secret(redacted)
    assert redacted == expected


@pytest.mark.parametrize("path", ["/var/lib/images/disk.zst", "disk.zst", "./a?b#c"])
def test_local_paths_are_left_alone(path: str) -> None:
    assert redact_url(path) == path


def test_file_urls_keep_their_path() -> None:
    assert redact_url("file:///srv/images/disk.zst") == "file:///srv/images/disk.zst"


@pytest.mark.parametrize(
    "url",
    [
        "http://us3r:pa55word@example.com:notaport/x?tok3n",
        "http://us3r:pa55word@example.com:99999/x?tok3n",
    ],
)
def test_a_malformed_port_does_not_raise_and_still_redacts(url: str) -> None:
    redacted = redact_url(url)

    _assert_no_secret(redacted)
    assert redacted.startswith("http://example.com")
