"""`sysext:NAME` and `confext:NAME`: real ext4 extension images, zstd-compressed by the zstd tool,
streamed by the real CLI into a host root in a temp directory (`--host-root`).

The image lands in the host's `var/lib/extensions` (or `var/lib/confexts`) through a staging
file, renamed into place once verified: any failure leaves the previous image untouched and no
staging file behind. An image already in place is recognised by the record its commit left and
not rewritten. The refresh runs through the real nsenter in a separate mount namespace standing
in for the node's (see `tests.support.host_namespace`), or directly with `--host-root /`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from tests.support.cli import (
    CliRun,
    imagestream_command,
    imagestream_env,
    imagestream_process,
    interrupt,
    result_record,
    run_imagestream,
)
from tests.support.extension_images import (
    ExtensionImage,
    build_extension_image,
    make_host_root,
)
from tests.support.host_namespace import (
    fake_refresh_tool,
    host_namespace,
    path_with,
    path_without_refresh_tools,
)
from tests.support.nginx import NginxFactory
from tests.support.tools import require_tool

from imagestream.targets.extension import RECORD_XATTR

pytestmark = pytest.mark.usefixtures("require_root")

#: `imagestream stream ARGS...`.
stream = functools.partial(run_imagestream, "stream")


@pytest.fixture
def host(tmp_path: Path) -> Path:
    return make_host_root(tmp_path / "host")


@pytest.fixture
def tools_v1(tmp_path: Path) -> ExtensionImage:
    return build_extension_image(tmp_path, "tools", seed=1)


@pytest.fixture
def tools_v2(tmp_path: Path) -> ExtensionImage:
    return build_extension_image(tmp_path, "tools", seed=2)


def put(
    image: ExtensionImage, target: str, host: Path, *extra: str, env: dict[str, str] | None = None
) -> CliRun:
    """`imagestream stream IMAGE TARGET --sha384 ... --host-root HOST --progress json EXTRA`."""
    return stream(
        image.compressed,
        target,
        "--sha384",
        image.sha384,
        "--host-root",
        host,
        "--progress",
        "json",
        *extra,
        env=env,
    )


def extensions(host: Path) -> Path:
    return host / "var/lib/extensions"


def fsck_clean(path: Path) -> None:
    """The ext4 filesystem in `path` checks clean (`fsck.ext4 -n -f`, read-only)."""
    subprocess.run([require_tool("fsck.ext4"), "-n", "-f", path], check=True, capture_output=True)


# -- written where systemd looks ---------------------------------------------------------------


def test_sysext_lands_in_the_extension_directory(host: Path, tools_v1: ExtensionImage) -> None:
    run = put(tools_v1, "sysext:tools", host)

    assert run.code == 0, run.text
    target = extensions(host) / "tools.raw"
    result = run.result()
    assert (result["ok"], result["verified"], result["target"]) == (True, True, str(target))
    assert "alreadyCurrent" not in result
    assert target.read_bytes() == tools_v1.raw_bytes
    # What `zstd -d` makes of the fetched bytes, independently.
    decoded = subprocess.run(
        [require_tool("zstd"), "-dc", tools_v1.compressed], capture_output=True, check=True
    ).stdout
    assert target.read_bytes() == decoded
    fsck_clean(target)
    assert sorted(p.name for p in extensions(host).iterdir()) == ["tools.raw"]  # no staging
    assert oct(extensions(host).stat().st_mode & 0o777) == "0o755"


def test_confext_lands_in_the_confext_directory(host: Path, tmp_path: Path) -> None:
    image = build_extension_image(tmp_path, "site", kind="confext", seed=3)

    run = put(image, "confext:site", host)

    assert run.code == 0, run.text
    target = host / "var/lib/confexts/site.raw"
    assert target.read_bytes() == image.raw_bytes
    assert not extensions(host).exists()


def test_a_new_version_replaces_the_old_one(
    host: Path, tools_v1: ExtensionImage, tools_v2: ExtensionImage
) -> None:
    assert put(tools_v1, "sysext:tools", host).code == 0

    run = put(tools_v2, "sysext:tools", host)

    assert run.code == 0, run.text
    assert (extensions(host) / "tools.raw").read_bytes() == tools_v2.raw_bytes
    assert sorted(p.name for p in extensions(host).iterdir()) == ["tools.raw"]


# -- failures keep the previous image ----------------------------------------------------------


def test_a_hash_mismatch_keeps_the_previous_image(
    host: Path, tools_v1: ExtensionImage, tools_v2: ExtensionImage
) -> None:
    assert put(tools_v1, "sysext:tools", host).code == 0
    target = extensions(host) / "tools.raw"
    before = target.stat()

    run = stream(
        tools_v2.compressed,
        "sysext:tools",
        "--sha384",
        hashlib.sha384(b"neither v1 nor v2").hexdigest(),
        "--host-root",
        host,
        "--progress",
        "json",
    )

    assert run.code == 4, run.text
    assert run.result()["reason"] == "HashMismatch"
    assert target.read_bytes() == tools_v1.raw_bytes
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in extensions(host).iterdir()) == ["tools.raw"]


def test_a_cancel_keeps_the_previous_image(
    host: Path, tmp_path: Path, tools_v1: ExtensionImage, nginx_factory: NginxFactory
) -> None:
    assert put(tools_v1, "sysext:tools", host).code == 0
    target = extensions(host) / "tools.raw"
    before = target.stat()
    docroot = tmp_path / "docroot"
    docroot.mkdir()
    big = build_extension_image(docroot, "tools", seed=4, size_mib=24, payload_mib=16)
    # About 2 MiB/s: 16 MiB of incompressible payload take 8 s; SIGTERM comes after 4 MiB.
    server = nginx_factory(docroot, extra_server_config="limit_rate 2m;")

    with imagestream_process(
        "stream",
        server.url_for(big.compressed.name),
        "sysext:tools",
        "--sha384",
        big.sha384,
        "--host-root",
        host,
        "--progress",
        "json",
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            record = json.loads(line)
            if record["event"] != "progress":
                pytest.fail(f"the stream ended before it could be cancelled: {record}")
            if record["bytesWritten"] >= 4 << 20:
                break
        stdout, stderr = interrupt(process)

    assert process.returncode == 130, stderr
    assert result_record(stdout, stderr)["reason"] == "Cancelled"
    assert target.read_bytes() == tools_v1.raw_bytes
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in extensions(host).iterdir()) == ["tools.raw"]


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("", "is empty"),
        ("../etc/passwd", "contains '/'"),
        ("a/b", "contains '/'"),
        ("..", "starts with '.'"),
        (".hidden", "starts with '.'"),
        ("tools.raw", "without it"),
        ("x" * 129, "longer than 128 bytes"),
        ("has space", "only letters, digits"),
        ("-dash", "only letters, digits"),
        ("tööls", "only letters, digits"),
    ],
)
def test_bad_names_are_usage_errors(
    name: str, words: str, host: Path, tools_v1: ExtensionImage
) -> None:
    run = put(tools_v1, f"sysext:{name}", host)

    assert run.code == 2, run.text
    result = run.result()
    assert result["reason"] == "InvalidRequest"
    assert words in result["message"]
    assert "Traceback" not in run.stderr
    assert sorted(p.name for p in (host / "var/lib").iterdir()) == []  # nothing created


# -- already current ---------------------------------------------------------------------------


def test_an_identical_image_is_already_current_and_not_rewritten(
    host: Path, tools_v1: ExtensionImage
) -> None:
    assert put(tools_v1, "sysext:tools", host).code == 0
    target = extensions(host) / "tools.raw"
    before = target.stat()
    record = json.loads(os.getxattr(target, RECORD_XATTR))
    assert record["sha384"] == tools_v1.sha384
    assert record["output"] == hashlib.sha384(tools_v1.raw_bytes).hexdigest()

    run = put(tools_v1, "sysext:tools", host)

    assert run.code == 0, run.text
    result = run.result()
    assert result["alreadyCurrent"] is True
    assert (result["bytesFetched"], result["bytesWritten"]) == (0, 0)
    assert result["sha384"] == tools_v1.sha384
    after = target.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_ctime_ns,
    )
    text = stream(
        tools_v1.compressed, "sysext:tools", "--sha384", tools_v1.sha384, "--host-root", host
    )
    assert text.code == 0
    assert "is already current, not rewritten" in text.text


def test_an_image_changed_in_place_is_streamed_again(host: Path, tools_v1: ExtensionImage) -> None:
    """Same size, same mtime, record intact: only the re-hash can tell, and it does."""
    assert put(tools_v1, "sysext:tools", host).code == 0
    target = extensions(host) / "tools.raw"
    before = target.stat()
    with target.open("r+b") as file:
        file.seek(before.st_size // 2)
        file.write(b"tampered")
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))

    run = put(tools_v1, "sysext:tools", host)

    assert run.code == 0, run.text
    assert "alreadyCurrent" not in run.result()
    assert target.read_bytes() == tools_v1.raw_bytes
    assert target.stat().st_ino != before.st_ino  # a new file, renamed into place


def test_an_identical_file_without_a_record_is_replaced(
    host: Path, tools_v1: ExtensionImage
) -> None:
    """Put there by someone else: nothing says which fetched bytes it came from."""
    extensions(host).mkdir()
    target = extensions(host) / "tools.raw"
    target.write_bytes(tools_v1.raw_bytes)

    run = put(tools_v1, "sysext:tools", host)

    assert run.code == 0, run.text
    assert "alreadyCurrent" not in run.result()
    assert json.loads(os.getxattr(target, RECORD_XATTR))["sha384"] == tools_v1.sha384


# -- refresh -----------------------------------------------------------------------------------


def test_refresh_runs_in_the_hosts_mount_namespace_after_the_commit(
    host: Path, tmp_path: Path, tools_v1: ExtensionImage
) -> None:
    log = tmp_path / "refresh.log"
    fake = fake_refresh_tool(tmp_path / "bin", "systemd-sysext", log)
    extensions(host).mkdir()  # the namespace's bind mount needs it before the stream
    with host_namespace(host):
        run = put(
            tools_v1,
            "sysext:tools",
            host,
            "--refresh",
            env=imagestream_env(PATH=path_with(fake.parent)),
        )

    assert run.code == 0, run.text
    refresh = run.result()["refresh"]
    assert refresh["status"] == "refreshed"
    assert refresh["command"][:2] == ["nsenter", f"--mount={host}/proc/1/ns/mnt"]
    assert "Merged extensions" in refresh["output"]
    # Run once, and it saw the verified image at the host's own path.
    raw_sha384 = hashlib.sha384(tools_v1.raw_bytes).hexdigest()
    assert log.read_text().splitlines() == [
        "args: refresh",
        f"{raw_sha384}  /var/lib/extensions/tools.raw",
    ]


def test_refresh_also_runs_when_the_image_is_already_current(
    host: Path, tmp_path: Path, tools_v1: ExtensionImage
) -> None:
    assert put(tools_v1, "sysext:tools", host).code == 0
    log = tmp_path / "refresh.log"
    fake = fake_refresh_tool(tmp_path / "bin", "systemd-sysext", log)
    with host_namespace(host):
        run = put(
            tools_v1,
            "sysext:tools",
            host,
            "--refresh",
            env=imagestream_env(PATH=path_with(fake.parent)),
        )

    assert run.code == 0, run.text
    assert run.result()["alreadyCurrent"] is True
    assert run.result()["refresh"]["status"] == "refreshed"
    assert log.read_text().startswith("args: refresh\n")


def test_a_missing_refresh_command_is_reported_and_the_image_kept(
    host: Path, tmp_path: Path, tools_v1: ExtensionImage
) -> None:
    extensions(host).mkdir()
    with host_namespace(host):
        run = put(
            tools_v1,
            "sysext:tools",
            host,
            "--refresh",
            env=imagestream_env(PATH=path_without_refresh_tools(tmp_path / "bin")),
        )
        text = stream(
            tools_v1.compressed,
            "sysext:tools",
            "--sha384",
            tools_v1.sha384,
            "--host-root",
            host,
            "--refresh",
            env=imagestream_env(PATH=path_without_refresh_tools(tmp_path / "bin2")),
        )

    assert run.code == 0, run.text
    refresh = run.result()["refresh"]
    assert refresh["status"] == "missing"
    assert "the host has no systemd-sysext" in refresh["output"]
    assert (extensions(host) / "tools.raw").read_bytes() == tools_v1.raw_bytes
    assert text.code == 0, text.text
    assert "systemd-sysext refresh not run: the host has no systemd-sysext" in text.text


def test_a_failing_refresh_fails_the_run_but_keeps_the_verified_image(
    host: Path, tmp_path: Path, tools_v1: ExtensionImage
) -> None:
    fake = fake_refresh_tool(tmp_path / "bin", "systemd-sysext", tmp_path / "log", exit_code=3)
    extensions(host).mkdir()
    with host_namespace(host):
        run = put(
            tools_v1,
            "sysext:tools",
            host,
            "--refresh",
            env=imagestream_env(PATH=path_with(fake.parent)),
        )

    assert run.code == 5, run.text
    result = run.result()
    assert result["reason"] == "ExtensionRefreshFailed"
    assert "is in place and verified" in result["message"]
    assert "exited with 3" in result["message"]
    assert (extensions(host) / "tools.raw").read_bytes() == tools_v1.raw_bytes


def test_with_host_root_slash_the_refresh_runs_directly(
    tmp_path: Path, tools_v1: ExtensionImage
) -> None:
    """`--host-root /` (the default) on a host: no nsenter. The CLI runs in a private mount
    namespace whose /var/lib is a temp directory, so this machine's own is never touched."""
    var_lib = tmp_path / "var-lib"
    var_lib.mkdir()
    log = tmp_path / "refresh.log"
    fake = fake_refresh_tool(tmp_path / "bin", "systemd-sysext", log)
    command = imagestream_command(
        "stream",
        tools_v1.compressed,
        "sysext:tools",
        "--sha384",
        tools_v1.sha384,
        "--refresh",
        "--progress",
        "json",
    )
    proc = subprocess.run(
        [
            require_tool("unshare"),
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            'mount --bind "$0" /var/lib && exec "$@"',
            var_lib,
            *command,
        ],
        capture_output=True,
        text=True,
        env=imagestream_env(PATH=path_with(fake.parent)),
        timeout=60,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    result = result_record(proc.stdout, proc.stderr)
    assert result["target"] == "/var/lib/extensions/tools.raw"
    assert result["refresh"]["command"] == ["systemd-sysext", "refresh"]
    assert (var_lib / "extensions/tools.raw").read_bytes() == tools_v1.raw_bytes
    assert "/var/lib/extensions/tools.raw" in log.read_text()


def test_refresh_is_refused_for_other_targets(tmp_path: Path, tools_v1: ExtensionImage) -> None:
    run = stream(tools_v1.compressed, tmp_path / "x.raw", "--sha384", tools_v1.sha384, "--refresh")

    assert run.code == 2, run.text
    assert "--refresh applies only to sysext:NAME and confext:NAME targets" in run.text
    assert not (tmp_path / "x.raw").exists()


# -- the TARGET's kind -------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["sysexts:tools", "SysExt:tools", "extension:tools", "x:y"])
def test_an_unknown_kind_is_a_usage_error_never_a_file(
    target: str, tmp_path: Path, tools_v1: ExtensionImage
) -> None:
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    proc = subprocess.run(
        imagestream_command("stream", tools_v1.compressed, target, "--sha384", tools_v1.sha384),
        cwd=workdir,
        capture_output=True,
        text=True,
        env=imagestream_env(),
        timeout=60,
        check=False,
    )

    assert proc.returncode == 2, proc.stderr
    message = " ".join(proc.stderr.split())
    assert "which is no kind of target" in message
    for kind in ("ab:DEV_A,DEV_B", "sysext:NAME", "confext:NAME", "disk:DEV"):
        assert kind in message
    assert list(workdir.iterdir()) == []


def test_a_file_whose_name_has_a_colon_is_written_as_dot_slash(
    tmp_path: Path, tools_v1: ExtensionImage
) -> None:
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    proc = subprocess.run(
        imagestream_command("stream", tools_v1.compressed, "./x:y", "--sha384", tools_v1.sha384),
        cwd=workdir,
        capture_output=True,
        text=True,
        env=imagestream_env(),
        timeout=60,
        check=False,
    )

    assert proc.returncode == 0, proc.stderr
    assert (workdir / "x:y").read_bytes() == tools_v1.raw_bytes
