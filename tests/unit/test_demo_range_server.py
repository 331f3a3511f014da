"""The demo's small range server (`imagestream.demo.range_server`): ranges, and its resets."""

from __future__ import annotations

import random
import time
from pathlib import Path

import httpx
import pytest

from imagestream.demo.range_server import RangeServer

SIZE = 3 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "demo image.zst"  # a space, to check the URL is quoted
    path.write_bytes(random.Random(3).randbytes(SIZE))
    return path


def test_it_serves_ranges_of_the_version_if_range_names(image: Path) -> None:
    data = image.read_bytes()
    with RangeServer(image) as server, httpx.Client() as client:
        whole = client.get(server.url)
        part = client.get(server.url, headers={"Range": "bytes=10-19"})
        rest = client.get(server.url, headers={"Range": f"bytes={SIZE - 5}-"})
        stale = client.get(server.url, headers={"Range": "bytes=10-", "If-Range": '"old"'})
        past = client.get(server.url, headers={"Range": f"bytes={SIZE}-"})

    assert (whole.status_code, whole.content) == (200, data)
    assert (part.status_code, part.content) == (206, data[10:20])
    assert part.headers["Content-Range"] == f"bytes 10-19/{SIZE}"
    assert (rest.status_code, rest.content) == (206, data[-5:])
    assert (stale.status_code, len(stale.content)) == (200, SIZE)
    assert (past.status_code, past.headers["Content-Range"]) == (416, f"bytes */{SIZE}")


def test_each_reset_cuts_one_response_and_the_rest_resumes(image: Path) -> None:
    data = image.read_bytes()
    received = bytearray()
    resets = 0
    with RangeServer(image, reset_offsets=[1 << 20, 2 << 20]) as server, httpx.Client() as client:
        while len(received) < SIZE:
            headers = {"Range": f"bytes={len(received)}-"}
            try:
                with client.stream("GET", server.url, headers=headers) as response:
                    for piece in response.iter_raw():
                        received += piece
            except httpx.TransportError:
                resets += 1
            assert resets <= 2

    assert resets == 2
    assert bytes(received) == data


def test_a_rate_paces_the_body_to_about_that_many_bytes_a_second(image: Path) -> None:
    rate = 2 << 20
    with RangeServer(image, rate=rate) as server, httpx.Client() as client:
        started = time.monotonic()
        body = client.get(server.url).content
        seconds = time.monotonic() - started
    assert body == image.read_bytes()
    measured = SIZE / seconds
    # 3 MiB at 2 MiB/s: about 1.5 s; the socket buffers let a little run ahead.
    assert rate / 1.5 <= measured <= rate * 1.5, f"{measured / (1 << 20):.2f} MiB/s"
