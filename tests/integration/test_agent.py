"""`imagestream agent` as a real process: instructions in env, a loop device, a real nginx.

The agent runs outside any container here, so the host's /proc is `/proc`, the host prefix is
empty and the target is the real `/dev/loopN`. The Kubernetes API is the recording stand-in of
`tests.support.fake_status_api`, which applies the agent's JSON patches to the one object it
holds (a real API server would also check the token, RBAC and the CRD schema); the kubeconfig
pointing at it is a real one, read by the real Kubernetes client.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import stat
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from tests.support.blockdev import LoopDeviceFactory
from tests.support.cli import (
    CliRun,
    imagestream_command,
    imagestream_env,
    imagestream_process,
    interrupt,
    one_line,
    run_imagestream,
)
from tests.support.extension_images import build_extension_image, make_host_root
from tests.support.fake_status_api import ApiRequest, FakeStatusApi, Mode
from tests.support.host_namespace import (
    fake_refresh_tool,
    host_namespace,
    path_with,
    path_without_refresh_tools,
)
from tests.support.nginx import Nginx, NginxFactory
from tests.support.oci_push import Layer, OciPusher
from tests.support.registry import TEST_USER, HtpasswdAuth, Registry, write_htpasswd
from tests.support.rss import run_measured
from tests.support.targets import MIB, PATTERN, fill_pattern, read_device, sha384_of
from tests.support.tools import require_tool, wait_until

from imagestream.agent.contract import AgentInstructions, AgentResult, env_name
from imagestream.controller.builders import agent_memory
from imagestream.demo.image import SampleImage, iter_raw_data, write_sample_image

pytestmark = pytest.mark.usefixtures("require_root")

NAMESPACE = "imagestream-system"
NAME = "node-7-root-b"
TOKEN = "agent-sa-token-do-not-log"
UID = "0b6c7d1e-4f0a-4c55-9d7e-2a1f3b4c5d6e"
STATUS_PATH = f"/apis/imagestream.dev/v1alpha1/namespaces/{NAMESPACE}/imagestreams/{NAME}/status"
INTERVAL = 0.5
DEVICE_SIZE = 16 * MIB
#: The backup GPT area of a whole loop disk (512-byte sectors), zeroed with the first write.
BACKUP_GPT_BYTES = 33 * 512
UPDATED_AT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


# -- helpers ----------------------------------------------------------------------------------


def instructions(source: str, image: SampleImage, dev: Path, tmp_path: Path) -> AgentInstructions:
    """What the controller would send, with the host paths of a process outside a container."""
    return AgentInstructions(
        name=NAME,
        namespace=NAMESPACE,
        uid=UID,
        generation=3,
        source=source,
        sha384=image.sha384,
        target=str(dev),
        host_proc="/proc",
        host_prefix="",
        termination_log=str(tmp_path / "termination-log"),
        stall_timeout=5.0,
        report_interval=INTERVAL,
    )


def agent_env(instr: AgentInstructions, tmp_path: Path, kubeconfig: Path | None) -> dict[str, str]:
    """A clean environment: the instructions, our kubeconfig (or none at all), an empty HOME."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        key: value
        for key, value in imagestream_env().items()
        if not key.startswith(("IMAGESTREAM_", "KUBERNETES_", "KUBECONFIG"))
    }
    env["HOME"] = str(home)  # no ~/.kube/config of whoever runs the tests
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    env.update(instr.to_env())
    return env


def run_agent(
    instr: AgentInstructions, tmp_path: Path, api: FakeStatusApi | None, *, path: str | None = None
) -> tuple[CliRun, AgentResult]:
    """Run `imagestream agent` to the end (with `path` as its PATH, if given); return the run
    and its termination message."""
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig", TOKEN) if api else None
    env = agent_env(instr, tmp_path, kubeconfig)
    if path is not None:
        env["PATH"] = path
    run = run_imagestream("agent", env=env, timeout=60)
    assert "Traceback" not in run.stderr, run.stderr
    return run, AgentResult.from_json(Path(instr.termination_log).read_text())


def progress_of(request: ApiRequest) -> dict[str, Any]:
    """The `status.progress` of a patch, after checking it is guarded by our uid and sets
    nothing else."""
    body = request.body
    assert isinstance(body, list), body
    test, add = body
    assert test == {"op": "test", "path": "/metadata/uid", "value": UID}, body
    assert (add["op"], add["path"]) == ("add", "/status/progress"), body
    progress: dict[str, Any] = add["value"]
    return progress


def assert_only_own_guarded_status_patches(api: FakeStatusApi) -> list[dict[str, Any]]:
    """Every request is a uid-guarded JSON PATCH of this ImageStream's status; return the
    progress reports."""
    requests = api.requests
    assert requests, "the agent sent no status patch"
    for request in requests:
        assert (request.method, request.path) == ("PATCH", STATUS_PATH)
        assert request.content_type == "application/json-patch+json"
        assert request.authorization == f"Bearer {TOKEN}"
    return [progress_of(request) for request in requests]


def assert_succeeded(run: CliRun, result: AgentResult, image: SampleImage, dev: Path) -> None:
    """Exit 0, a verified result naming the device, and the device holds the raw image."""
    assert run.code == 0, run.stderr
    assert result.outcome == "Succeeded", result
    assert result.sha384 == image.sha384
    assert result.target == str(dev)
    assert result.bytes_fetched == image.compressed_size
    assert result.bytes_written == image.raw_size
    assert sha384_of(dev, image.raw_size) == image.raw_sha384
    assert TOKEN not in run.stderr + run.stdout


@pytest.fixture
def image(nginx_docroot: Path) -> SampleImage:
    """4 MiB raw, about 1.3 MiB compressed: a second and a half at nginx's 1 MiB/s limit."""
    return write_sample_image(nginx_docroot / "root.img.zst", 4 * MIB, seed=11)


@pytest.fixture
def dev(loop_device_factory: LoopDeviceFactory) -> Path:
    """A 16 MiB loop device filled with PATTERN, so zeros and image bytes mean something."""
    device = loop_device_factory(DEVICE_SIZE)
    fill_pattern(device, DEVICE_SIZE)
    return device


@pytest.fixture
def slow_url(nginx_factory: NginxFactory, nginx_docroot: Path) -> str:
    """The image from a real nginx at about 1 MiB/s, so the stream spans several intervals."""
    server = nginx_factory(nginx_docroot, extra_server_config="limit_rate 1m;")
    return server.url_for("root.img.zst")


# -- success ----------------------------------------------------------------------------------


def test_success_reports_progress_at_most_once_per_interval(
    image: SampleImage, dev: Path, slow_url: str, tmp_path: Path
) -> None:
    instr = instructions(slow_url, image, dev, tmp_path)
    with FakeStatusApi(uid=UID) as api:
        run, result = run_agent(instr, tmp_path, api)

    assert_succeeded(run, result, image, dev)
    progress = assert_only_own_guarded_status_patches(api)
    # At most one patch per interval: n patches sent at least INTERVAL apart span (n-1)
    # intervals; one interval of slack for network jitter on arrival.
    times = [request.at for request in api.requests]
    assert (len(times) - 1) * INTERVAL <= times[-1] - times[0] + INTERVAL
    assert len(progress) >= 2, "expected progress during the stream and a final patch"
    assert progress[0]["phase"] == "Running"
    final = progress[-1]
    assert final["bytesFetched"] == image.compressed_size
    assert final["bytesTotal"] == image.compressed_size
    assert final["bytesWritten"] == image.raw_size
    assert final["percent"] == 100
    assert final["phase"] == "Verifying"  # the verdict is the controller's, not the progress's
    assert all(UPDATED_AT.fullmatch(p["updatedAt"]) for p in progress)
    fetched = [p["bytesFetched"] for p in progress]
    assert fetched == sorted(fetched)


def test_a_re_created_image_stream_gets_no_progress_of_the_old_agent(
    image: SampleImage, dev: Path, slow_url: str, tmp_path: Path
) -> None:
    """The ImageStream is deleted and re-created under its name mid-stream: the agent's next
    patch is refused (its uid test fails), it stops patching, and the stream still succeeds.

    A real API server holds the whole object and answers the same generic 422; the stand-in
    holds only uid and status, which is all the agent's patches and its one GET touch."""
    instr = instructions(slow_url, image, dev, tmp_path)
    re_created = "7e57a1b2-0000-4c55-9d7e-re-created00"
    with FakeStatusApi(uid=UID) as api:
        env = agent_env(instr, tmp_path, api.kubeconfig(tmp_path / "kubeconfig", TOKEN))
        with imagestream_process("agent", env=env) as process:
            wait_until(lambda: "progress" in api.object["status"], 30, what="a progress patch")
            api.reset(re_created)
            _, stderr = process.communicate(timeout=60)
        methods = [request.method for request in api.requests]
        final = api.object

    assert process.returncode == 0, stderr
    result = AgentResult.from_json(Path(instr.termination_log).read_text())
    assert result.outcome == "Succeeded"
    assert sha384_of(dev, image.raw_size) == image.raw_sha384
    assert final == {"metadata": {"uid": re_created}, "status": {}}
    # One refused patch (whether sent just before or after the re-creation), one GET to tell
    # why, then no more patches.
    assert methods.count("GET") == 1, methods
    assert "PATCH" not in methods[methods.index("GET") :], methods
    assert (
        stderr.count(
            f"ImageStream {NAMESPACE}/{NAME} was re-created (uid differs); no more progress updates"
        )
        == 1
    ), stderr
    assert "status progress update failed" not in stderr


def test_without_api_configuration_the_stream_still_runs(
    image: SampleImage, dev: Path, tmp_path: Path
) -> None:
    instr = instructions(str(image.path), image, dev, tmp_path)

    run, result = run_agent(instr, tmp_path, api=None)

    assert_succeeded(run, result, image, dev)
    assert "without status progress" in run.stderr


@pytest.mark.parametrize("mode", ["fail", "hang"])
def test_broken_api_server_does_not_stop_the_stream(
    mode: Mode, image: SampleImage, dev: Path, slow_url: str, tmp_path: Path
) -> None:
    """500 on every patch, or no answer at all: the stream and its verdict are unaffected."""
    instr = instructions(slow_url, image, dev, tmp_path)
    with FakeStatusApi(mode, UID) as api:
        run, result = run_agent(instr, tmp_path, api)

    assert_succeeded(run, result, image, dev)
    assert_only_own_guarded_status_patches(api)
    if mode == "fail":
        assert len(api.requests) >= 2, "a failed patch is retried on the next tick"
        # Logged once, not once per tick, and without the token.
        assert run.stderr.count("status progress update failed") == 1, run.stderr
        assert "500" in run.stderr


@pytest.mark.parametrize("sigterm", [False, True], ids=["exit", "sigterm"])
def test_a_hanging_api_after_the_verdict_keeps_the_success(
    sigterm: bool, image: SampleImage, dev: Path, tmp_path: Path
) -> None:
    """The verdict is written while a status patch still hangs: the agent must still exit 0.

    Both used to end as crashes: the interpreter's teardown aborted (SIGABRT) on the reporter
    thread stuck in its request, and a SIGTERM after the verdict (the ImageStream deleted just
    as the stream ended) met the default action Python restores at teardown (exit 143).
    """
    instr = instructions(str(image.path), image, dev, tmp_path)
    log = Path(instr.termination_log)
    with FakeStatusApi("hang", UID) as api:
        env = agent_env(instr, tmp_path, api.kubeconfig(tmp_path / "kubeconfig", TOKEN))
        with imagestream_process("agent", env=env) as process:
            wait_until(lambda: log.exists() and log.stat().st_size > 0, 30, what="the verdict")
            if sigterm:
                assert process.poll() is None, "expected the agent to wait on its final patch"
                process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)

    assert process.returncode == 0, stderr
    assert AgentResult.from_json(log.read_text()).outcome == "Succeeded"
    assert sha384_of(dev, image.raw_size) == image.raw_sha384


def test_oci_source_with_basic_auth_secret(image: SampleImage, dev: Path, tmp_path: Path) -> None:
    """A real registry with Basic auth; the credentials come as a mounted basic-auth Secret."""
    password = "agent-registry-password"
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {TEST_USER: password})
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "username").write_text(TEST_USER)
    (secret / "password").write_text(password)
    with Registry(tmp_path / "registry", auth=HtpasswdAuth(htpasswd)) as registry:
        pusher = OciPusher(registry, credentials=(TEST_USER, password))
        pushed = pusher.push_artifact("os/root", "v1", [Layer(image.path)])
        instr = replace(
            instructions(registry.reference("os/root", tag="v1"), image, dev, tmp_path),
            auth_dir=str(secret),
            layer=image.path.name,
        )
        with FakeStatusApi(uid=UID) as api:
            run, result = run_agent(instr, tmp_path, api)

    assert_succeeded(run, result, image, dev)
    assert result.digest == pushed.layers[image.path.name].digest
    assert password not in run.stderr
    assert_only_own_guarded_status_patches(api)


# -- failures ---------------------------------------------------------------------------------


def test_hash_mismatch_fails_and_leaves_the_target_invalid(
    image: SampleImage, dev: Path, nginx: Any, tmp_path: Path
) -> None:
    wrong = hashlib.sha384(b"another image").hexdigest()
    instr = replace(instructions(nginx.url_for("root.img.zst"), image, dev, tmp_path), sha384=wrong)
    with FakeStatusApi(uid=UID) as api:
        run, result = run_agent(instr, tmp_path, api)

    assert run.code == 4, run.stderr
    assert (result.outcome, result.reason) == ("Failed", "HashMismatch")
    assert wrong in result.message
    assert result.sha384 is None
    assert result.target == str(dev)
    assert read_device(dev, MIB) == bytes(MIB)  # the first MiB zeroed: never looks valid


def test_sigterm_mid_stream_cancels_and_leaves_the_target_invalid(
    dev: Path, nginx_factory: NginxFactory, nginx_docroot: Path, tmp_path: Path
) -> None:
    # 16 MiB raw, ~5 MiB fetched at 1 MiB/s: several seconds, SIGTERM after the first buffer.
    image = write_sample_image(nginx_docroot / "big.zst", DEVICE_SIZE, seed=12)
    server = nginx_factory(nginx_docroot, extra_server_config="limit_rate 1m;")
    instr = instructions(server.url_for("big.zst"), image, dev, tmp_path)
    with FakeStatusApi(uid=UID) as api:
        env = agent_env(instr, tmp_path, api.kubeconfig(tmp_path / "kubeconfig", TOKEN))
        with imagestream_process("agent", env=env) as process:
            # The agent's own progress patches say when a buffer past the first MiB is written.
            wait_until(
                lambda: any(progress_of(r)["bytesWritten"] >= 4 * MIB for r in api.requests),
                30,
                what="4 MiB written",
            )
            _, stderr = interrupt(process)

    assert process.returncode == 130, stderr
    result = AgentResult.from_json(Path(instr.termination_log).read_text())
    assert (result.outcome, result.reason) == ("Failed", "Cancelled")
    assert result.bytes_written >= 4 * MIB  # the last numbers seen, not zeros
    assert result.bytes_fetched < image.compressed_size
    assert read_device(dev, MIB) == bytes(MIB)
    # The end of the device was never reached, but its backup GPT area was zeroed up front.
    end = read_device(dev, MIB, DEVICE_SIZE - MIB)
    assert end[:-BACKUP_GPT_BYTES] == PATTERN[:-BACKUP_GPT_BYTES]
    assert end[-BACKUP_GPT_BYTES:] == bytes(BACKUP_GPT_BYTES)


def test_missing_instructions_fail_naming_the_variables(
    image: SampleImage, dev: Path, tmp_path: Path
) -> None:
    instr = instructions(str(image.path), image, dev, tmp_path)
    with FakeStatusApi(uid=UID) as api:
        env = agent_env(instr, tmp_path, api.kubeconfig(tmp_path / "kubeconfig", TOKEN))
        del env[env_name("name")], env[env_name("sha384")]
        run = run_imagestream("agent", env=env, timeout=60)

    assert run.code == 2, run.stderr
    result = AgentResult.from_json(Path(instr.termination_log).read_text())
    assert (result.outcome, result.reason) == ("Failed", "InvalidRequest")
    assert "IMAGESTREAM_NAME" in result.message
    assert "IMAGESTREAM_SHA384" in result.message
    assert result.target == str(dev)
    assert api.requests == []  # it does not know whose status to patch
    assert read_device(dev, MIB) == PATTERN  # nothing written


# -- long zstd windows: what the agent accepts, and the memory its Job gets for it -------------

LONG_WINDOW_LOG = 30


def zstd_long(dest: Path, window_log: int) -> SampleImage:
    """Raw data 256 MiB longer than the window (so the decoder fills its whole window buffer)
    through `zstd --long=N` from a pipe, as an image build makes it: no content size in the
    header, so the frame declares the full 2^N window."""
    zstd = require_tool("zstd")
    raw_size = (1 << window_log) + 256 * MIB
    raw_hash = hashlib.sha384()
    with dest.open("wb") as out:
        command = [zstd, "-q", "-T1", f"--long={window_log}", "-c", "-"]
        with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out) as process:
            assert process.stdin is not None
            for chunk in iter_raw_data(raw_size, seed=31):
                raw_hash.update(chunk)
                process.stdin.write(chunk)
            process.stdin.close()
            assert process.wait() == 0
    return SampleImage(
        path=dest,
        raw_size=raw_size,
        compressed_size=dest.stat().st_size,
        sha384=sha384_of(dest),
        raw_sha384=raw_hash.hexdigest(),
    )


@pytest.fixture(scope="module")
def long_window_images(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[int], SampleImage]:
    """`images(N)`: the `zstd --long=N` image, made once per module."""
    made: dict[int, SampleImage] = {}
    directory = tmp_path_factory.mktemp("long-window")

    def image(window_log: int) -> SampleImage:
        if window_log not in made:
            made[window_log] = zstd_long(directory / f"long{window_log}.img.zst", window_log)
        return made[window_log]

    return image


@pytest.fixture
def long_window_image(long_window_images: Callable[[int], SampleImage]) -> SampleImage:
    """The `zstd --long=30` image: 1.25 GiB raw, about 0.5 GiB compressed."""
    return long_window_images(LONG_WINDOW_LOG)


@pytest.mark.slow
@pytest.mark.parametrize("window_log", [27, LONG_WINDOW_LOG])
def test_a_long_window_image_streams_within_the_memory_its_job_gets(
    window_log: int,
    long_window_images: Callable[[int], SampleImage],
    loop_device_factory: LoopDeviceFactory,
    nginx: Nginx,
    tmp_path: Path,
) -> None:
    """maxWindowLog N, a `zstd --long=N` image from nginx: the stream succeeds, and the agent's
    peak RSS (the kernel's count, as in test_memory.py) stays below the memory limit the Job
    builder gives a 2^N window: the default 27 and a long 30."""
    image = long_window_images(window_log)
    os.link(image.path, nginx.docroot / image.path.name)
    dev = loop_device_factory(image.raw_size)
    instr = replace(
        instructions(nginx.url_for(image.path.name), image, dev, tmp_path),
        max_window_log=window_log,
    )
    with FakeStatusApi(uid=UID) as api:
        env = agent_env(instr, tmp_path, api.kubeconfig(tmp_path / "kubeconfig", TOKEN))
        with (tmp_path / "stdout").open("wb") as stdout, (tmp_path / "stderr").open("wb") as err:
            peak = run_measured(
                imagestream_command("agent"),
                env=env,
                stdout=stdout,
                stderr=err,
                report=tmp_path / "rusage.json",
                timeout=280,
            )
    stderr = (tmp_path / "stderr").read_text()

    assert peak.exit_code == 0, stderr
    result = AgentResult.from_json(Path(instr.termination_log).read_text())
    assert (result.outcome, result.sha384) == ("Succeeded", image.sha384), result
    assert result.bytes_written == image.raw_size
    assert sha384_of(dev, image.raw_size) == image.raw_sha384
    assert_only_own_guarded_status_patches(api)
    memory = agent_memory(window_log)
    report = (
        f"2^{window_log}: peak RSS {peak.peak_rss_mib:.1f} MiB; Job request "
        f"{memory.request_mib} Mi, limit {memory.limit_mib} Mi"
    )
    print(report)
    # The window really was filled (else the comparison below would prove nothing)...
    assert peak.peak_rss_mib > (1 << window_log) / MIB, report
    # ...and the limit holds it.
    assert peak.peak_rss_mib < memory.limit_mib, report


def test_the_default_window_log_refuses_a_long_window_image_before_writing(
    long_window_image: SampleImage, dev: Path, tmp_path: Path
) -> None:
    """maxWindowLog left at 27: WindowTooLarge at the frame header, naming the value that
    would do, and not one byte of the target changed."""
    instr = instructions(str(long_window_image.path), long_window_image, dev, tmp_path)
    assert instr.max_window_log == 27
    with FakeStatusApi(uid=UID) as api:
        run, result = run_agent(instr, tmp_path, api)

    assert run.code == 4, run.stderr
    assert (result.outcome, result.reason) == ("Failed", "WindowTooLarge")
    assert "set spec.source.maxWindowLog: 30 " in result.message
    assert "more than the allowed 2^27" in result.message
    assert result.bytes_written == 0
    assert result.seconds < 10  # the header, not 1.25 GiB of decoding, decided
    assert read_device(dev, DEVICE_SIZE) == PATTERN * (DEVICE_SIZE // MIB)


def test_the_cli_names_its_flag_for_a_long_window_image(
    long_window_image: SampleImage, dev: Path
) -> None:
    run = run_imagestream(
        "stream",
        long_window_image.path,
        dev,
        "--sha384",
        long_window_image.sha384,
        "--max-window-log",
        "27",
        timeout=60,
    )

    assert run.code == 4, run.stderr
    message = one_line(run.stderr)
    assert "WindowTooLarge" in message
    assert "raise --max-window-log to 30" in message, message
    assert "maxWindowLog" not in message
    assert read_device(dev, DEVICE_SIZE) == PATTERN * (DEVICE_SIZE // MIB)


# -- the target is the one the controller named -----------------------------------------------


def test_a_missing_device_fails_target_not_found_and_creates_nothing(
    image: SampleImage, dev: Path, tmp_path: Path
) -> None:
    """In its Pod the agent sees the host's /dev at /host/dev: a typo'd device there is not a
    new file in the host's devtmpfs, reported Succeeded, but TargetNotFound by the host path.

    Stand-in: `host/dev` is a directory with a real device node of the loop device (as the
    host's /dev holds them), not a bind mount of the host's /dev.
    """
    host = tmp_path / "host"
    host_dev = host / "dev"
    host_dev.mkdir(parents=True)
    os.mknod(host_dev / dev.name, 0o600 | stat.S_IFBLK, os.stat(dev).st_rdev)
    base = replace(instructions(str(image.path), image, dev, tmp_path), host_prefix=str(host))

    typo = replace(base, target=str(host_dev / "loop-typo"))
    run, result = run_agent(typo, tmp_path, None)

    assert run.code == 5, run.stderr
    assert (result.outcome, result.reason) == ("Failed", "TargetNotFound")
    assert "/dev/loop-typo" in result.message
    assert str(host) not in result.message
    assert result.target == "/dev/loop-typo"
    assert sorted(p.name for p in host_dev.iterdir()) == [dev.name]

    # The same instructions naming the node that exists write the device.
    run, result = run_agent(replace(base, target=str(host_dev / dev.name)), tmp_path, None)
    assert run.code == 0, run.stderr
    assert (result.outcome, result.target) == ("Succeeded", f"/dev/{dev.name}")
    assert sha384_of(dev, image.raw_size) == image.raw_sha384


# -- extensions --------------------------------------------------------------------------------


def extension_instructions(
    host: Path, kind: str, name: str, tmp_path: Path, *, source: str, sha384: str, **more: Any
) -> AgentInstructions:
    """An extension stream as the controller builds it: the host's extension directory of
    `kind` is the agent's allowed directory, under the host prefix."""
    directory = "var/lib/extensions" if kind == "sysext" else "var/lib/confexts"
    return AgentInstructions(
        name=NAME,
        namespace=NAMESPACE,
        uid=UID,
        generation=1,
        source=source,
        sha384=sha384,
        target=name,
        target_kind=kind,
        allowed_dir=str(host / directory),
        host_prefix=str(host),
        termination_log=str(tmp_path / "termination-log"),
        **more,
    )


def test_an_extension_is_written_under_the_host_prefix_and_refreshed_on_the_host(
    nginx: Nginx, nginx_docroot: Path, tmp_path: Path
) -> None:
    """What the controller sends for `extension: {type: sysext, name: tools, refresh: true}`:
    the type and name, planned in the mounted extension directory, refreshed through nsenter
    in the node's mount namespace (stand-in: `tests.support.host_namespace`, a separate mount
    namespace whose /var/lib is the host root's; `systemd-sysext` is a script first on PATH)."""
    host = make_host_root(tmp_path / "host")
    (host / "var/lib/extensions").mkdir()
    image = build_extension_image(nginx_docroot, "tools", seed=5)
    log = tmp_path / "refresh.log"
    fake = fake_refresh_tool(tmp_path / "bin", "systemd-sysext", log)
    instr = extension_instructions(
        host,
        "sysext",
        "tools",
        tmp_path,
        source=nginx.url_for(image.compressed.name),
        sha384=image.sha384,
        refresh=True,
        host_proc=str(host / "proc"),
    )
    with host_namespace(host):
        run, result = run_agent(instr, tmp_path, None, path=path_with(fake.parent))
        again_run, again = run_agent(instr, tmp_path, None, path=path_with(fake.parent))

    assert run.code == 0, run.stderr
    assert (result.outcome, result.target) == ("Succeeded", "/var/lib/extensions/tools.raw")
    assert result.message == (
        "wrote /var/lib/extensions/tools.raw: SHA-384 verified; systemd-sysext refresh done: "
        "Merged extensions into /usr."
    )
    assert (host / "var/lib/extensions/tools.raw").read_bytes() == image.raw_bytes
    assert again_run.code == 0, again_run.stderr
    assert again.message.startswith(
        "/var/lib/extensions/tools.raw is already current, not rewritten: SHA-384 verified"
    )
    assert again.bytes_fetched == 0
    raw_sha384 = hashlib.sha384(image.raw_bytes).hexdigest()
    seen = f"{raw_sha384}  /var/lib/extensions/tools.raw"
    assert log.read_text().splitlines() == ["args: refresh", seen, "args: refresh", seen]


def test_an_extension_refresh_missing_on_the_host_still_succeeds(
    nginx: Nginx, nginx_docroot: Path, tmp_path: Path
) -> None:
    host = make_host_root(tmp_path / "host")
    (host / "var/lib/confexts").mkdir()
    image = build_extension_image(nginx_docroot, "site", kind="confext", seed=6)
    instr = extension_instructions(
        host,
        "confext",
        "site",
        tmp_path,
        source=nginx.url_for(image.compressed.name),
        sha384=image.sha384,
        refresh=True,
        host_proc=str(host / "proc"),
    )
    with host_namespace(host):
        run, result = run_agent(
            instr, tmp_path, None, path=path_without_refresh_tools(tmp_path / "bin")
        )

    assert run.code == 0, run.stderr
    assert result.outcome == "Succeeded"
    assert "systemd-confext refresh not run: the host has no systemd-confext" in result.message
    assert (host / "var/lib/confexts/site.raw").read_bytes() == image.raw_bytes


def test_a_bad_extension_name_fails_before_anything_is_fetched(tmp_path: Path) -> None:
    host = make_host_root(tmp_path / "host")
    instr = extension_instructions(
        host,
        "sysext",
        "../../etc/x",
        tmp_path,
        source="http://127.0.0.1:9/never-fetched.zst",
        sha384="0" * 96,
    )
    run, result = run_agent(instr, tmp_path, None)

    assert run.code == 2, run.stderr
    assert (result.outcome, result.reason) == ("Failed", "InvalidRequest")
    assert "IMAGESTREAM_TARGET: the extension name '../../etc/x' contains '/'" in result.message
    assert result.target == "../../etc/x"
    assert list((host / "var/lib").iterdir()) == []
