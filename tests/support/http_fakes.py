"""Response pieces for ``httpx.MockTransport`` stand-ins: streamed bodies and ranged answers.

A real server's body arrives in pieces over a socket and can break off mid-way; these fakes
give unit tests the same shape without a socket: :class:`Body` yields pieces and may end in a
connection reset, :class:`Unreadable` fails the test if anyone reads it, and
:func:`partial_response` answers a ``Range: bytes=N-`` request with a 206.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import httpx

_RANGE_FROM = re.compile(r"bytes=(\d+)-$")


class Body(httpx.SyncByteStream):
    """A body in ``piece``-byte pieces that breaks off (connection reset) after ``cut`` bytes.

    Without ``cut`` every byte is sent and the body ends normally.
    """

    def __init__(self, data: bytes, cut: int | None = None, piece: int = 64 << 10) -> None:
        self._data = data
        self._cut = cut
        self._piece = piece

    def __iter__(self) -> Iterator[bytes]:
        end = len(self._data) if self._cut is None else self._cut
        for start in range(0, end, self._piece):
            yield self._data[start : min(end, start + self._piece)]
        if self._cut is not None:
            raise httpx.ReadError("[Errno 104] Connection reset by peer")


class Unreadable(httpx.SyncByteStream):
    """An error body that must not be read: its Content-Length promises bytes never sent."""

    def __iter__(self) -> Iterator[bytes]:
        raise AssertionError("the body of this answer must not be read")


def range_start(request: httpx.Request) -> int:
    """The first byte a ``Range: bytes=N-`` request asks for (the only form readers send)."""
    match = _RANGE_FROM.match(request.headers["range"])
    assert match, request.headers["range"]
    return int(match.group(1))


def partial_response(
    data: bytes,
    start: int,
    headers: Mapping[str, str] | None = None,
    *,
    cut: int | None = None,
    piece: int = 64 << 10,
) -> httpx.Response:
    """A 206 with ``data[start:]``, its Content-Range and Content-Length, and ``headers``.

    ``cut`` breaks the body off after that many of its bytes (see :class:`Body`).
    """
    body = data[start:]
    ranged = {
        **(headers or {}),
        "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}",
        "Content-Length": str(len(body)),
    }
    return httpx.Response(206, headers=ranged, stream=Body(body, cut, piece))
