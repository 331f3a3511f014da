"""The service's pure parts: Trident's messages as the issue fixes them, our reasons in them,
the hash and URL rules, the disk choice, the listen addresses, and the generated modules."""

from __future__ import annotations

import filecmp
import io
import json
import tarfile
from pathlib import Path

import pytest

from imagestream.demo.image import write_raw_image, write_sample_image
from imagestream.errors import (
    Cancelled,
    ImageStreamError,
    IntegrityError,
    SourceError,
    TargetError,
    UsageError,
)
from imagestream.pipeline.progress import Progress
from imagestream.reasons import Reason
from imagestream.service import wire
from imagestream.service.activation import activated_socket
from imagestream.service.disks import DiskFacts, ImageFacts, choose_disk, image_facts
from imagestream.service.listen import TlsFiles, parse_listen
from imagestream.service.proto import generate, version_pb2
from imagestream.service.proto import streaming_pb2 as pb

DIGEST = "ab" * 48


# -- the wire format is Trident's, name for name and number for number ------------------------

FIELDS = {
    "StreamDiskRequest": {"image_url": 1, "image_hash": 2, "reboot": 3},
    "RebootManagement": {"handling": 1},
    "ServicingResponse": {"timestamp": 1, "started": 2, "log": 3, "completed": 4},
    "Started": {},
    "Log": {"level": 1, "message": 2, "module": 3, "target": 4, "location": 5},
    "FileLocation": {"path": 1, "line": 2},
    "Completed": {
        "status": 1,
        "error": 2,
        "reboot_status": 3,
        "image_hash": 4,
        "servicing_kind": 5,
    },
    "TridentError": {"kind": 1, "subkind": 2, "message": 3, "error_message": 4, "location": 5},
}
ENUMS = {
    "RebootHandling": [
        "REBOOT_HANDLING_UNSPECIFIED",
        "TRIDENT_HANDLES_REBOOT",
        "CALLER_HANDLES_REBOOT",
    ],
    "LogLevel": [
        "LOG_LEVEL_UNSPECIFIED",
        "LOG_LEVEL_ERROR",
        "LOG_LEVEL_WARN",
        "LOG_LEVEL_INFO",
        "LOG_LEVEL_DEBUG",
        "LOG_LEVEL_TRACE",
    ],
    "StatusCode": ["STATUS_CODE_UNSPECIFIED", "STATUS_CODE_SUCCESS", "STATUS_CODE_FAILURE"],
    "RebootStatus": [
        "REBOOT_STATUS_UNSPECIFIED",
        "REBOOT_NOT_REQUIRED",
        "REBOOT_REQUIRED",
        "REBOOT_STARTED",
    ],
    "ServicingKind": [
        "SERVICING_KIND_UNSPECIFIED",
        "SERVICING_KIND_NONE_REQUIRED",
        "SERVICING_KIND_RUNTIME_UPDATE",
        "SERVICING_KIND_AB_UPDATE",
        "SERVICING_KIND_CLEAN_INSTALL",
        "SERVICING_KIND_MANUAL_ROLLBACK_AB",
        "SERVICING_KIND_MANUAL_ROLLBACK_RUNTIME",
    ],
    "TridentErrorKind": [
        "TRIDENT_ERROR_KIND_UNSPECIFIED",
        "EXECUTION_ENVIRONMENT_MISCONFIGURATION_ERROR",
        "HEALTH_CHECKS_ERROR",
        "INITIALIZATION_ERROR",
        "INTERNAL_ERROR",
        "INVALID_INPUT_ERROR",
        "SERVICING_ERROR",
        "UNSUPPORTED_CONFIGURATION_ERROR",
    ],
}


def test_messages_have_tridents_fields_and_numbers() -> None:
    assert pb.DESCRIPTOR.package == "trident.v1"
    for name, fields in FIELDS.items():
        message = pb.DESCRIPTOR.message_types_by_name[name]
        assert message.full_name == f"trident.v1.{name}"
        assert {f.name: f.number for f in message.fields} == fields, name
    timestamp = pb.ServicingResponse.DESCRIPTOR.fields_by_name["timestamp"].message_type
    assert timestamp is not None
    assert timestamp.full_name == "google.protobuf.Timestamp"
    oneof = pb.ServicingResponse.DESCRIPTOR.oneofs_by_name["response"]
    assert [f.name for f in oneof.fields] == ["started", "log", "completed"]
    optional = {
        ("StreamDiskRequest", "image_hash"),
        ("Completed", "error"),
        ("Completed", "image_hash"),
        ("Completed", "servicing_kind"),
    }
    for message_name, field_name in optional:
        field = pb.DESCRIPTOR.message_types_by_name[message_name].fields_by_name[field_name]
        assert field.has_presence, (message_name, field_name)


def test_enums_have_tridents_values() -> None:
    for name, values in ENUMS.items():
        enum = pb.DESCRIPTOR.enum_types_by_name[name]
        assert [(v.name, v.number) for v in enum.values] == [
            (value, number) for number, value in enumerate(values)
        ], name


def test_services_are_tridents() -> None:
    streaming = pb.DESCRIPTOR.services_by_name["StreamingService"]
    method = streaming.methods_by_name["StreamDisk"]
    assert streaming.full_name == "trident.v1.StreamingService"
    assert method.input_type.full_name == "trident.v1.StreamDiskRequest"
    assert method.output_type.full_name == "trident.v1.ServicingResponse"
    assert method.server_streaming
    assert not method.client_streaming
    version = version_pb2.DESCRIPTOR.services_by_name["VersionService"]
    assert version.full_name == "trident.v1.VersionService"
    call = version.methods_by_name["Version"]
    assert call.input_type.full_name == "trident.v1.VersionRequest"
    assert [(f.name, f.number) for f in call.output_type.fields] == [("version", 1)]


def test_generated_modules_are_what_protoc_makes_of_the_proto_files(tmp_path: Path) -> None:
    generate.generate(tmp_path)
    fresh = tmp_path / "imagestream/service/proto"
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in generate.HERE.glob("*_pb2*.py*"))
    _, mismatch, errors = filecmp.cmpfiles(fresh, generate.HERE, names, shallow=False)
    assert not mismatch, f"regenerate with python -m imagestream.service.proto.generate: {mismatch}"
    assert not errors


# -- hashes and URLs ---------------------------------------------------------------------------


def test_image_hash_is_sha384_prefixed_hex() -> None:
    assert wire.parse_image_hash(f"sha384:{DIGEST}", allow_unverified=False) == DIGEST
    assert wire.parse_image_hash(f" SHA384:{DIGEST.upper()} ", allow_unverified=False) == DIGEST
    assert wire.parse_image_hash(None, allow_unverified=True) is None


@pytest.mark.parametrize("value", [None, ""])
def test_a_missing_hash_is_hash_required(value: str | None) -> None:
    with pytest.raises(UsageError) as refused:
        wire.parse_image_hash(value, allow_unverified=False)
    assert refused.value.reason is Reason.HASH_REQUIRED
    assert wire.error_kind(refused.value) == pb.INVALID_INPUT_ERROR


@pytest.mark.parametrize(
    "value", [DIGEST, "sha256:" + "a" * 64, f"sha384:{DIGEST}0", "sha384:" + "g" * 96]
)
def test_a_hash_of_another_form_is_invalid_input(value: str) -> None:
    with pytest.raises(UsageError) as refused:
        wire.parse_image_hash(value, allow_unverified=True)
    assert refused.value.reason is Reason.INVALID_REQUEST
    assert "sha384:<96 hex digits>" in refused.value.message


@pytest.mark.parametrize("url", ["/etc/shadow", "file:///etc/shadow", "ftp://x/y", ""])
def test_only_remote_images_are_accepted(url: str) -> None:
    with pytest.raises(UsageError):
        wire.check_image_url(url)


# -- our reasons in Trident's error kinds, and back to our exit codes -------------------------


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (UsageError("bad url"), pb.INVALID_INPUT_ERROR),
        (SourceError("reset", reason=Reason.RETRIES_EXHAUSTED), pb.SERVICING_ERROR),
        (IntegrityError("x", reason=Reason.HASH_MISMATCH), pb.SERVICING_ERROR),
        (IntegrityError("x", reason=Reason.CORRUPT_STREAM), pb.SERVICING_ERROR),
        (TargetError("x", reason=Reason.TARGET_MOUNTED), pb.SERVICING_ERROR),
        (TargetError("x", reason=Reason.TARGET_TOO_SMALL), pb.UNSUPPORTED_CONFIGURATION_ERROR),
        (TargetError("x", reason=Reason.NO_DISK_FITS), pb.UNSUPPORTED_CONFIGURATION_ERROR),
        (
            TargetError("x", reason=Reason.SECTOR_SIZE_MISMATCH),
            pb.UNSUPPORTED_CONFIGURATION_ERROR,
        ),
        (IntegrityError("x", reason=Reason.COSI_INVALID), pb.INVALID_INPUT_ERROR),
        (IntegrityError("x", reason=Reason.COSI_UNSUPPORTED), pb.INVALID_INPUT_ERROR),
        (
            TargetError("x", reason=Reason.TARGET_KIND_UNSUPPORTED),
            pb.UNSUPPORTED_CONFIGURATION_ERROR,
        ),
        (SourceError("x", reason=Reason.INVALID_MANIFEST), pb.INVALID_INPUT_ERROR),
        (Cancelled("stopped"), pb.SERVICING_ERROR),
        (ImageStreamError("bug", reason=Reason.INTERNAL_ERROR), pb.INTERNAL_ERROR),
    ],
)
def test_error_kinds_and_the_reason_as_subkind(
    error: ImageStreamError, kind: pb.TridentErrorKind.ValueType
) -> None:
    response = wire.completed_failure(error)
    assert response.completed.status == pb.STATUS_CODE_FAILURE
    assert response.completed.error.kind == kind
    assert response.completed.error.subkind == str(error.reason)
    assert response.completed.error.message == error.message
    assert response.completed.reboot_status == pb.REBOOT_NOT_REQUIRED
    assert not response.completed.HasField("image_hash")
    back = wire.error_from_completed(response.completed)
    assert back.exit_code == error.exit_code
    assert back.reason is error.reason


def test_an_unknown_subkind_is_taken_by_its_kind() -> None:
    completed = pb.Completed(
        status=pb.STATUS_CODE_FAILURE,
        error=pb.TridentError(kind=pb.INVALID_INPUT_ERROR, subkind="SomethingNew", message="m"),
    )
    assert wire.error_from_completed(completed).exit_code == UsageError.exit_code


def test_success_names_the_hash_clean_install_and_the_reboot() -> None:
    completed = wire.completed_success(DIGEST, pb.REBOOT_STARTED).completed
    assert completed.status == pb.STATUS_CODE_SUCCESS
    assert completed.image_hash == f"sha384:{DIGEST}"
    assert completed.servicing_kind == pb.SERVICING_KIND_CLEAN_INSTALL
    assert completed.reboot_status == pb.REBOOT_STARTED


# -- the progress line ---------------------------------------------------------------------------


def _progress(written: int, fetched: int, total: int | None, resumes: int = 0) -> Progress:
    return Progress("Running", fetched, total, written, 410e6, resumes, 3.0)


def test_progress_line_reads_as_the_issue_shows_it_and_back() -> None:
    gib = 1 << 30
    progress = _progress(int(1.2 * gib), int(0.421 * 10 * gib), 10 * gib, resumes=1)
    line = wire.progress_line(progress, int(2.85 * gib))
    assert line == "progress 42.1% 1.20 GiB of 2.85 GiB written, 410 MB/s, 1 resume"
    back = wire.progress_from_line(line, 3.0)
    assert back is not None
    assert back.bytes_written == int(1.20 * gib)
    assert back.bytes_total == int(2.85 * gib)
    assert back.resumes == 1
    assert back.bytes_per_second == 410e6


def test_progress_line_names_the_partition_of_a_cosi_image() -> None:
    progress = Progress("Running", 50, 100, 3 * MIB, 20e6, 0, 1.0, partition=2, partitions=3)
    line = wire.progress_line(progress, None)
    assert line == "progress 50.0% 3.00 MiB written, 20 MB/s, partition 2 of 3, 0 resumes"
    back = wire.progress_from_line(line, 1.0)
    assert back is not None
    assert (back.partition, back.partitions) == (2, 3)


def test_progress_line_without_sizes() -> None:
    line = wire.progress_line(_progress(512, 0, None, resumes=2), None)
    assert line == "progress ?% 512 B written, 410 MB/s, 2 resumes"
    back = wire.progress_from_line(line, 1.0)
    assert back is not None
    assert back.bytes_total is None
    assert wire.progress_from_line("resolved source http://x", 1.0) is None


# -- the disk choice -----------------------------------------------------------------------------

MIB = 1 << 20


def test_the_smallest_fitting_disk_wins_and_every_other_is_explained() -> None:
    disks = [
        DiskFacts(Path("/dev/big"), 64 * MIB),
        DiskFacts(Path("/dev/tiny"), 4 * MIB),
        DiskFacts(Path("/dev/ro"), 16 * MIB, "read-only"),
        DiskFacts(Path("/dev/fit"), 12 * MIB),
    ]
    choice = choose_disk(disks, 8 * MIB)
    assert choice.disk == Path("/dev/fit")
    assert choice.why == f"the smallest disk that fits ({12 * MIB} bytes for {8 * MIB})"
    assert set(choice.skipped) == {
        f"/dev/tiny: too small ({4 * MIB} bytes for {8 * MIB})",
        "/dev/ro: read-only",
        f"/dev/big: larger ({64 * MIB} bytes)",
    }


def test_an_unknown_size_takes_the_largest_usable_disk() -> None:
    disks = [DiskFacts(Path("/dev/a"), 8 * MIB), DiskFacts(Path("/dev/b"), 32 * MIB)]
    choice = choose_disk(disks, None)
    assert choice.disk == Path("/dev/b")
    assert "not known in advance" in choice.why


def test_no_disk_fits_names_each_cause() -> None:
    disks = [
        DiskFacts(Path("/dev/a"), 4 * MIB),
        DiskFacts(Path("/dev/b"), None, "is mounted at /srv (as /dev/b); unmount it first"),
    ]
    with pytest.raises(TargetError) as refused:
        choose_disk(disks, 8 * MIB)
    assert refused.value.reason is Reason.NO_DISK_FITS
    assert "/dev/a: too small" in refused.value.message
    assert "/dev/b: is mounted at /srv" in refused.value.message


# -- what an image's first bytes tell -----------------------------------------------------------


def _tar(*members: tuple[str, bytes], pax: bool = False) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if pax:  # an extended header before the entry, as GNU tar --format=pax writes
                info.pax_headers = {"comment": "x"}
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_a_cosi_archive_needs_its_disk_size() -> None:
    metadata = json.dumps({"version": "1.2", "disk": {"size": 3 * MIB, "lbaSize": 512}})
    head = _tar(("cosi-marker", b""), ("metadata.json", metadata.encode()), ("images/x", b"x"))
    assert image_facts(head, 10 * MIB) == ImageFacts(cosi=True, needed=3 * MIB)
    extended = _tar(("cosi-marker", b""), ("metadata.json", metadata.encode()), pax=True)
    assert image_facts(extended, 10 * MIB) == ImageFacts(cosi=True, needed=3 * MIB)
    assert image_facts(head[:700], 10 * MIB) == ImageFacts(cosi=True, needed=None)
    other = _tar(("README", b"hello"))
    assert image_facts(other, len(other)) == ImageFacts(cosi=False, needed=len(other))


def test_raw_and_zstd_images_need_what_they_write(tmp_path: Path) -> None:
    raw = write_raw_image(tmp_path / "raw", 2 * MIB)
    zst = write_sample_image(tmp_path / "zst", 3 * MIB)
    head = raw.path.read_bytes()[:4096]
    assert image_facts(head, raw.compressed_size) == ImageFacts(cosi=False, needed=2 * MIB)
    head = zst.path.read_bytes()[:4096]
    assert image_facts(head, zst.compressed_size) == ImageFacts(cosi=False, needed=3 * MIB)
    streamed = write_sample_image(tmp_path / "pipe", MIB, content_size=False)
    assert image_facts(streamed.path.read_bytes()[:4096], 1) == ImageFacts(False, None)


# -- listen addresses ----------------------------------------------------------------------------

TLS = TlsFiles(Path("c"), Path("k"), Path("ca"))


def test_listen_addresses() -> None:
    assert parse_listen("unix:///run/x.sock", None) == ("unix", "/run/x.sock")
    assert parse_listen("tcp://0.0.0.0:50051", TLS) == ("tcp", "0.0.0.0:50051")
    assert parse_listen("tcp://[::1]:50051", TLS) == ("tcp", "[::1]:50051")


@pytest.mark.parametrize(
    ("address", "tls", "words"),
    [
        ("tcp://127.0.0.1:50051", None, "there is no plaintext TCP"),
        ("unix://relative.sock", None, "must be absolute"),
        ("unix:///run/x.sock", TLS, "apply to tcp:// only"),
        ("tcp://127.0.0.1", TLS, "expected tcp://HOST:PORT"),
        ("http://127.0.0.1:80", None, "expected unix:///PATH or tcp://HOST:PORT"),
    ],
)
def test_listen_refusals(address: str, tls: TlsFiles | None, words: str) -> None:
    with pytest.raises(UsageError) as refused:
        parse_listen(address, tls)
    assert words in refused.value.message


# -- systemd socket activation: whose sockets, how many -------------------------------------


def test_activation_needs_listen_pid_to_be_ours_and_clears_the_variables() -> None:
    environ = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "x", "PATH": "/bin"}
    assert activated_socket(environ, pid=4242) is None
    assert environ == {"PATH": "/bin"}, "a child (the reboot command) must not inherit them"
    assert activated_socket({}, pid=4242) is None


def test_activation_refuses_more_than_one_socket() -> None:
    with pytest.raises(UsageError) as refused:
        activated_socket({"LISTEN_FDS": "2", "LISTEN_PID": "4242"}, pid=4242)
    assert "takes exactly 1" in refused.value.message
