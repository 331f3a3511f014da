"""gzip, xz and bzip2 decoding: every member, bounded output, truncation and corruption caught.

The compressed bytes come from the real `gzip`, `xz` and `bzip2` tools; concatenating their
outputs is what `cat a.gz b.gz` (and pigz, pbzip2, `xz -T`) produce. The decoders are driven
the way the decompression stage drives them, through `decompress_stage` over a channel.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import threading
from collections.abc import Callable

import pytest
from tests.support.tools import require_tool

from imagestream.errors import IntegrityError
from imagestream.pipeline.buffers import BufferPool, Filled
from imagestream.pipeline.channel import Aborted, Channel
from imagestream.pipeline.decoders import StreamDecoder, bzip2_decoder, gzip_decoder, xz_decoder
from imagestream.pipeline.decompress import (
    ChannelReader,
    Compression,
    decompress_stage,
    resolve_compression,
)

MiB = 1 << 20
FORMATS = ("gzip", "xz", "bzip2")
# Text-like data: compressible, and every offset distinguishable.
DATA = b"".join(b"line %07d of the raw image\n" % n for n in range(40_000))  # ~1.1 MB


def compress(tool: str, data: bytes, *flags: str) -> bytes:
    """`tool -c FLAGS` over `data`: the real command-line tool's output."""
    return subprocess.run(
        [require_tool(tool), "-c", *flags], input=data, capture_output=True, check=True
    ).stdout


def decoder_of(name: str, max_window_log: int = 27) -> StreamDecoder:
    factories: dict[str, Callable[[], StreamDecoder]] = {
        "gzip": gzip_decoder,
        "xz": lambda: xz_decoder(max_window_log),
        "bzip2": bzip2_decoder,
    }
    return factories[name]()


def decode_all(decoder: StreamDecoder, data: bytes, piece: int, max_length: int) -> bytes:
    """Feed `data` in `piece`-byte pieces as the stage does; check every call's bound."""
    out = bytearray()
    pos = 0
    while True:
        chunk = b""
        if decoder.needs_input:
            chunk, pos = data[pos : pos + piece], pos + piece
            if not chunk:
                decoder.finish()
                return bytes(out)
        decoded = decoder.decode(chunk, max_length)
        assert len(decoded) <= max_length
        out += decoded


def run_stage(data: bytes, compression: Compression, *, max_window_log: int = 27) -> bytes:
    """`decompress_stage` over `data` in 64 KiB chunks; the output it handed on."""
    abort = threading.Event()
    chunks: Channel[bytes] = Channel(4, abort)
    filled: Channel[Filled] = Channel(4, abort)
    pool = BufferPool(4, MiB, abort)
    out = bytearray()
    errors: list[BaseException] = []

    def feed() -> None:
        with contextlib.suppress(Aborted):
            for start in range(0, len(data), 64 << 10):
                chunks.put(data[start : start + (64 << 10)])
            chunks.close()

    def drain() -> None:
        with contextlib.suppress(Aborted):
            while (item := filled.get()) is not None:
                out.extend(item.view())
                pool.give_back(item.buffer)

    threads = [threading.Thread(target=feed), threading.Thread(target=drain)]
    for thread in threads:
        thread.start()
    try:
        produced = decompress_stage(
            ChannelReader(chunks),
            compression=compression,
            pool=pool,
            out=filled,
            max_window_log=max_window_log,
        )
    except BaseException as exc:
        errors.append(exc)
        abort.set()
    for thread in threads:
        thread.join(10)
    if errors:
        raise errors[0]
    assert produced == len(out)
    return bytes(out)


# -- detection --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
def test_auto_detects_each_format_by_its_magic_bytes(name: str) -> None:
    head = compress(name, DATA)[:18]

    assert resolve_compression(Compression.AUTO, head) is Compression(name)


def test_auto_detects_an_empty_bzip2_stream() -> None:
    assert resolve_compression(Compression.AUTO, compress("bzip2", b"")) is Compression.BZIP2


@pytest.mark.parametrize(
    "head", [b"", b"\x1f\x8b", b"\x1f\x8b\x07rest", b"BZh0" + bytes(6), b"BZh9notblock", b"\xfd7zX"]
)
def test_raw_data_is_passed_through(head: bytes) -> None:
    assert resolve_compression(Compression.AUTO, head) is Compression.NONE


def test_an_explicit_compression_is_never_second_guessed() -> None:
    assert resolve_compression(Compression.NONE, compress("gzip", DATA)) is Compression.NONE


# -- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize(("piece", "max_length"), [(1, 4096), (7, 1), (64 << 10, MiB)])
def test_every_member_is_decoded_with_bounded_output(
    name: str, piece: int, max_length: int
) -> None:
    if piece == 1 and name == "bzip2":
        piece = 97  # byte by byte is minutes of bz2 calls; a prime piece still splits headers
    # Three members/streams, each from its own tool run and level: what `cat` of files makes.
    parts = [DATA[:300_000], DATA[300_000:300_001], DATA[300_001:]]
    data = b"".join(
        compress(name, part, f"-{level}") for part, level in zip(parts, "191", strict=True)
    )
    decoder = decoder_of(name)

    assert decode_all(decoder, data, piece, max_length) == DATA
    assert decoder.parts == 3
    assert decoder.produced == len(DATA)


@pytest.mark.parametrize("name", FORMATS)
def test_a_bomb_is_decoded_in_bounded_steps(name: str) -> None:
    bomb = compress(name, bytes(32 * MiB))
    assert len(bomb) < MiB // 4  # highly compressible
    decoder = decoder_of(name)
    digest = hashlib.sha256()
    calls = 0
    pos = 0
    while True:
        chunk = b""
        if decoder.needs_input:
            chunk, pos = bomb[pos : pos + MiB], pos + MiB
            if not chunk:
                decoder.finish()
                break
        decoded = decoder.decode(chunk, MiB)
        assert len(decoded) <= MiB
        digest.update(decoded)
        calls += 1

    assert digest.digest() == hashlib.sha256(bytes(32 * MiB)).digest()
    assert calls >= 32


@pytest.mark.parametrize("name", FORMATS)
def test_the_stage_writes_the_raw_bytes(name: str) -> None:
    data = compress(name, DATA) + compress(name, DATA[:1000])

    assert run_stage(data, Compression(name)) == DATA + DATA[:1000]


# -- truncation, corruption, limits ------------------------------------------------------------


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("keep", [1, 5, 11, 0.5, -1, -4, -8])
def test_a_cut_stream_is_truncated(name: str, keep: float) -> None:
    data = compress(name, DATA)
    cut = data[: int(len(data) * keep)] if isinstance(keep, float) else data[:keep]

    with pytest.raises(IntegrityError) as caught:
        run_stage(cut, Compression(name))

    assert caught.value.reason == "TruncatedStream", caught.value.message
    assert name in caught.value.message


@pytest.mark.parametrize("name", FORMATS)
def test_a_stream_cut_inside_its_second_member_is_truncated(name: str) -> None:
    first = compress(name, DATA)
    data = first + compress(name, DATA)[:200]

    with pytest.raises(IntegrityError, match="2") as caught:
        run_stage(data, Compression(name))

    assert caught.value.reason == "TruncatedStream"


@pytest.mark.parametrize("name", FORMATS)
def test_empty_input_forced_to_a_format_holds_nothing(name: str) -> None:
    with pytest.raises(IntegrityError, match="holds no") as caught:
        run_stage(b"", Compression(name))

    assert caught.value.reason == "TruncatedStream"


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("where", [0.3, 0.6, 0.95])
def test_a_flipped_byte_is_corrupt(name: str, where: float) -> None:
    data = bytearray(compress(name, DATA))
    data[int(len(data) * where)] ^= 0x55

    with pytest.raises(IntegrityError) as caught:
        run_stage(bytes(data), Compression(name))

    assert caught.value.reason == "CorruptStream", caught.value.message


@pytest.mark.parametrize("name", FORMATS)
def test_data_after_the_last_member_is_corrupt(name: str) -> None:
    data = compress(name, DATA) + b"not compressed data at all"

    with pytest.raises(IntegrityError) as caught:
        run_stage(data, Compression(name))

    assert caught.value.reason == "CorruptStream"


@pytest.mark.parametrize("name", ["gzip", "bzip2"])
def test_raw_data_forced_to_a_format_is_corrupt(name: str) -> None:
    with pytest.raises(IntegrityError) as caught:
        run_stage(DATA, Compression(name))

    assert caught.value.reason == "CorruptStream"


def test_xz_stream_padding_in_fours_is_accepted_between_and_after_streams() -> None:
    one = compress("xz", DATA[:5000])
    data = one + bytes(8) + one + bytes(4)

    assert run_stage(data, Compression.XZ) == DATA[:5000] * 2


@pytest.mark.parametrize("padding", [1, 3, 6])
def test_xz_stream_padding_not_in_fours_is_corrupt(padding: int) -> None:
    one = compress("xz", DATA[:5000])

    with pytest.raises(IntegrityError, match="padding") as caught:
        run_stage(one + bytes(padding) + one, Compression.XZ)

    assert caught.value.reason == "CorruptStream"


def test_an_xz_dictionary_beyond_the_window_limit_is_refused() -> None:
    # `xz -9` uses a 64 MiB dictionary: more than 2^20 allows, within 2^27.
    data = compress("xz", DATA, "-9")

    with pytest.raises(IntegrityError, match="max-window-log") as caught:
        run_stage(data, Compression.XZ, max_window_log=20)
    assert caught.value.reason == "WindowTooLarge"
    assert run_stage(data, Compression.XZ, max_window_log=27) == DATA
