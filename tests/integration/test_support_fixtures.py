"""Self-tests of the test support: the real servers and block devices behave as tests assume."""

import errno
import os
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
from tests.support.blockdev import (
    LoopDeviceFactory,
    device_size,
    loop_backing_file,
    loop_device,
    mount_points,
    mounted_ext4,
    small_tmpfs,
)
from tests.support.nginx import Nginx, TLSNginx
from tests.support.tinyproxy import Tinyproxy
from tests.support.tools import find_tool, require_tool, wait_until

MiB = 1024 * 1024


def _client(*, proxy: str | None = None, verify: ssl.SSLContext | bool = True) -> httpx.Client:
    # trust_env=False: an HTTP(S)_PROXY set in the environment (CI runners) must not route
    # these requests anywhere but where the test says.
    return httpx.Client(trust_env=False, timeout=10.0, proxy=proxy, verify=verify)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text(encoding="ascii")
    return [int(child) for child in children.split()]


# -- tools ------------------------------------------------------------------------------------


def test_require_tool_finds_sbin_tools() -> None:
    assert require_tool("nginx").endswith("/nginx")
    assert require_tool("losetup").endswith("/losetup")


def test_require_tool_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = "imagestream-no-such-tool"
    assert find_tool(missing) is None
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=missing):
        require_tool(missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=missing):
        require_tool(missing)


# -- nginx ------------------------------------------------------------------------------------


def test_nginx_serves_ranges_with_content_range_and_etag(nginx: Nginx, nginx_docroot: Path) -> None:
    data = os.urandom(64 * 1024)
    (nginx_docroot / "image.raw").write_bytes(data)
    url = nginx.url_for("image.raw")

    with _client() as client:
        full = client.get(url)
        part = client.get(url, headers={"Range": "bytes=1000-1999"})
        tail = client.get(url, headers={"Range": "bytes=65000-"})
        etag = full.headers["ETag"]
        if_range_ok = client.get(url, headers={"Range": "bytes=0-9", "If-Range": etag})
        if_range_stale = client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
        unsatisfiable = client.get(url, headers={"Range": f"bytes={len(data)}-"})

    assert full.status_code == 200
    assert full.http_version == "HTTP/1.1"
    assert full.content == data
    assert full.headers["Accept-Ranges"] == "bytes"
    # A strong ETag, identical for the full object and its parts.
    assert etag.startswith('"')
    assert etag.endswith('"')
    assert part.headers["ETag"] == etag

    assert part.status_code == 206
    assert part.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    assert part.headers["Content-Length"] == "1000"
    assert part.content == data[1000:2000]

    assert tail.status_code == 206
    assert tail.headers["Content-Range"] == f"bytes 65000-{len(data) - 1}/{len(data)}"
    assert tail.content == data[65000:]

    assert if_range_ok.status_code == 206
    assert if_range_ok.content == data[:10]
    assert if_range_stale.status_code == 200  # If-Range mismatch: whole object
    assert if_range_stale.content == data
    assert unsatisfiable.status_code == 416

    log = nginx.access_log(min_entries=6)
    assert [(e.status, e.range) for e in log] == [
        (200, ""),
        (206, "bytes=1000-1999"),
        (206, "bytes=65000-"),
        (206, "bytes=0-9"),
        (200, "bytes=0-9"),
        (416, f"bytes={len(data)}-"),
    ]
    assert log[3].if_range == etag


def test_nginx_etag_changes_with_mtime(nginx: Nginx, nginx_docroot: Path) -> None:
    path = nginx_docroot / "a.bin"
    path.write_bytes(b"x" * 100)
    os.utime(path, (1_700_000_000, 1_700_000_000))
    with _client() as client:
        first = client.head(nginx.url_for("a.bin")).headers["ETag"]
        path.write_bytes(b"y" * 100)  # same size ...
        os.utime(path, (1_700_000_000, 1_700_000_000))  # ... same mtime: same ETag (!)
        same = client.head(nginx.url_for("a.bin")).headers["ETag"]
        os.utime(path, (1_700_000_001, 1_700_000_001))
        changed = client.head(nginx.url_for("a.bin")).headers["ETag"]
    assert same == first
    assert changed != first


def test_nginx_stop_leaves_no_processes(tmp_path: Path) -> None:
    docroot = tmp_path / "docroot"
    docroot.mkdir()
    with Nginx(docroot, tmp_path / "work", worker_processes=2) as server:
        master = server.pid
        # The master forks its workers just after it is ready (listening, pid file written).
        wait_until(lambda: len(_children(master)) == 2, 10.0, what="2 nginx workers")
        workers = _children(master)
        assert server.is_running()
    assert not server.is_running()
    assert not _process_exists(master)
    assert not any(_process_exists(worker) for worker in workers)


def test_nginx_tls_verifies_only_with_the_ca_bundle(nginx_tls: TLSNginx) -> None:
    (nginx_tls.docroot / "hello.txt").write_text("hello")
    url = nginx_tls.url_for("hello.txt")
    assert url.startswith("https://127.0.0.1:")

    context = ssl.create_default_context(cafile=str(nginx_tls.ca_bundle))
    with _client(verify=context) as client:
        response = client.get(url)
        by_name = client.get(url.replace("127.0.0.1", "localhost"))
    assert response.status_code == 200
    assert response.text == "hello"
    assert by_name.status_code == 200

    with _client() as client, pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        client.get(url)  # default trust store (certifi) does not know the test CA


# -- tinyproxy --------------------------------------------------------------------------------


def test_tinyproxy_carries_http_request(
    nginx: Nginx, nginx_docroot: Path, tinyproxy: Tinyproxy
) -> None:
    (nginx_docroot / "via-proxy.bin").write_bytes(b"0123456789")
    url = nginx.url_for("via-proxy.bin")
    assert tinyproxy.requests_seen() == []

    with _client(proxy=tinyproxy.url) as client:
        response = client.get(url, headers={"Range": "bytes=2-5"})

    assert response.status_code == 206
    assert response.content == b"2345"
    assert tinyproxy.requests_seen() == [f"GET {url} HTTP/1.1"]
    # The origin saw the request arrive from the proxy, Range header intact.
    (entry,) = nginx.access_log(min_entries=1)
    assert "tinyproxy" in entry.via
    assert entry.range == "bytes=2-5"


def test_tinyproxy_tunnels_https_to_any_port(nginx_tls: TLSNginx, tinyproxy: Tinyproxy) -> None:
    (nginx_tls.docroot / "secret.txt").write_text("tunnelled")
    context = ssl.create_default_context(cafile=str(nginx_tls.ca_bundle))
    with _client(proxy=tinyproxy.url, verify=context) as client:
        response = client.get(nginx_tls.url_for("secret.txt"))
    assert response.text == "tunnelled"
    authority = nginx_tls.base_url.removeprefix("https://")
    assert tinyproxy.requests_seen() == [f"CONNECT {authority} HTTP/1.1"]


def test_tinyproxy_stop_leaves_no_process(tmp_path: Path) -> None:
    with Tinyproxy(tmp_path / "tp") as proxy:
        pid = proxy.pid
        assert proxy.is_running()
    assert not _process_exists(pid)


# -- block devices ----------------------------------------------------------------------------


@pytest.mark.usefixtures("require_root")
def test_loop_device_has_size_and_is_detached(tmp_path: Path) -> None:
    size = 8 * MiB
    with loop_device(size, tmp_path) as dev:
        backing = loop_backing_file(dev)
        assert backing is not None
        assert backing.parent == tmp_path.resolve()
        assert backing.stat().st_blocks == 0  # sparse
        assert device_size(dev) == size
        blockdev = require_tool("blockdev")
        getsize = subprocess.run(
            [blockdev, "--getsize64", str(dev)], check=True, capture_output=True, text=True
        )
        assert int(getsize.stdout) == size

        # Bytes written to the device land in the backing file.
        payload = os.urandom(4096)
        with open(dev, "r+b", buffering=0) as device:
            device.seek(MiB)
            device.write(payload)
            os.fsync(device.fileno())
        with open(backing, "rb") as file:
            file.seek(MiB)
            assert file.read(4096) == payload

    # Another process (a parallel test run) may have attached the freed /dev/loopN already.
    assert loop_backing_file(dev) != backing
    assert not backing.exists()
    losetup = require_tool("losetup")
    listing = subprocess.run(
        [losetup, "--list", "--noheadings", "--output", "NAME,BACK-FILE"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert str(backing) not in listing


def test_loop_device_factory_makes_distinct_devices(
    loop_device_factory: LoopDeviceFactory,
) -> None:
    first = loop_device_factory(4 * MiB)
    second = loop_device_factory(6 * MiB)
    assert first != second
    assert first.is_block_device()
    assert device_size(first) == 4 * MiB
    assert device_size(second) == 6 * MiB


def _mountinfo_line(mountpoint: Path) -> str | None:
    target = str(mountpoint.resolve())
    with open("/proc/self/mountinfo", encoding="utf-8") as mountinfo:
        for line in mountinfo:
            if line.split()[4] == target:
                return line
    return None


def test_mounted_ext4_is_mounted_then_gone(
    loop_device_factory: LoopDeviceFactory, tmp_path: Path
) -> None:
    dev = loop_device_factory(32 * MiB)
    mountpoint = tmp_path / "mnt"
    with mounted_ext4(dev, mountpoint) as mounted:
        assert mounted == mountpoint
        line = _mountinfo_line(mountpoint)
        assert line is not None
        fs_type, source = line.split(" - ")[1].split()[:2]
        assert fs_type == "ext4"
        assert source == str(dev)
        (mountpoint / "file").write_text("on ext4")
    assert _mountinfo_line(mountpoint) is None
    assert str(mountpoint.resolve()) not in mount_points()
    assert not (mountpoint / "file").exists()


def _write_zeros(path: Path, size: int) -> None:
    # Unbuffered, so ENOSPC is raised by the write that hits the limit, not by close().
    chunk = b"\0" * 64 * 1024
    with open(path, "wb", buffering=0) as file:
        for _ in range(size // len(chunk)):
            file.write(chunk)


@pytest.mark.usefixtures("require_root")
def test_small_tmpfs_runs_out_of_space(tmp_path: Path) -> None:
    mountpoint = tmp_path / "small"
    with small_tmpfs(mountpoint, "1m"):
        line = _mountinfo_line(mountpoint)
        assert line is not None
        assert line.split(" - ")[1].split()[0] == "tmpfs"
        with pytest.raises(OSError, match="No space left on device") as excinfo:
            _write_zeros(mountpoint / "fill", 2 * MiB)
        assert excinfo.value.errno == errno.ENOSPC
        # tmpfs counts whole pages: the file holds (about) the 1 MiB the mount allows.
        assert 0.9 * MiB < (mountpoint / "fill").stat().st_size <= MiB
    assert _mountinfo_line(mountpoint) is None
