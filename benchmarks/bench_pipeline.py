"""Side-by-side throughput and memory benchmark of the imagestream pipeline (DESIGN.md §6).

Three contenders stream the same zstd image, served by a real nginx on loopback, onto a real loop
device (or, for the ceiling, into /dev/null):

* ours:    ``imagestream stream URL DEV --sha384 HEX --progress plain``
* native:  ``curl -s URL | tee >(sha384sum >FILE) | zstd -d | dd of=DEV bs=4M oflag=direct
  conv=fsync status=none``
* ceiling: ``zstd -dc FILE > /dev/null`` (single-threaded decompression of the same file)

With ``--oci`` a real ``docker-registry`` (filesystem storage in the temp dir) holds the same file
as a one-layer artifact ``bench/os:1``, and two more contenders run in every round:

* ours-oci:   ``imagestream stream oci://127.0.0.1:PORT/bench/os:1 DEV --sha384 HEX ...``
  (resolves the manifest, then verifies the blob's sha256 digest beside the SHA-384)
* native-oci: ``curl -s BLOB_URL | tee >(sha384sum >FILE) >(sha256sum >FILE) | zstd -d | dd ...``

They run alternately (the order of ours and native flips every round), each under the same
conditions: the target is discarded (``blkdiscard``: a sparse backing file again) and, in the
default ``--cache cold`` mode, the page cache is dropped before every run, so nginx and zstd read
the image from disk each time. After each run, outside the timed part, the first ``raw_size``
bytes of the target are read back (caches dropped first) and hashed; a run whose target does not
hash to the image's raw SHA-384 is reported as broken and left out of the medians.

Wall time covers process start to exit (for ours that includes Python start-up and imports).
Peak RSS is the child's ``ru_maxrss`` from ``os.wait4`` (for the native pipeline: its largest
single process). Nothing here asserts: the bars of the design are printed beside the numbers.

Run as root::

    .venv/bin/python benchmarks/bench_pipeline.py [--size-gib 1] [--runs 3] [--rss-sizes 1,4] \\
        [--oci]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

# `tests.support` lives in the repository, not in the installed distribution.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zstandard
from tests.support.blockdev import loop_device
from tests.support.nginx import Nginx
from tests.support.oci_push import Layer, OciPusher
from tests.support.registry import Registry
from tests.support.tools import find_tool

from imagestream.demo.image import SampleImage, write_sample_image

GIB = 1 << 30
MIB = 1 << 20
MB = 1_000_000

# The bars of DESIGN.md §6.
BAR_OURS_NATIVE = 1.2
BAR_OURS_CEILING = 0.5
BAR_RSS_MIB = 80.0
# "The same for a 1 GiB and a 4 GiB image": how much growth this report still calls flat.
RSS_FLAT_TOLERANCE_MIB = 4.0

_LOOP_SLACK = 16 * MIB  # the target is a little larger than the image, like a real partition
_READ_BACK_CHUNK = 4 * MIB
_SHA_WAIT_SECONDS = 10.0
_DIGEST_LINE = re.compile(r"^([0-9a-f]{64,128})\s")
_TOOLS = ("nginx", "curl", "zstd", "dd", "bash", "losetup", "blkdiscard", "sha384sum", "tee")
_OCI_TOOLS = ("docker-registry", "sha256sum")
OCI_REPOSITORY = "bench/os"
OCI_TAG = "1"


# -- measurements ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """One timed child process."""

    seconds: float
    returncode: int
    maxrss_kib: int
    cpu_seconds: float  # user + system of the command and the children it waited for

    @property
    def maxrss_mib(self) -> float:
        """Peak RSS in MiB (``ru_maxrss`` is in KiB on Linux)."""
        return self.maxrss_kib / 1024


@dataclass(frozen=True)
class Run:
    """One run of one contender, with the outcome of the checks done after it."""

    kind: str
    measurement: Measurement
    output_bytes: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when the run exited 0 and every check after it passed."""
        return not self.problems

    @property
    def mb_per_s(self) -> float:
        """Output throughput in MB/s (10^6 bytes)."""
        return self.output_bytes / MB / self.measurement.seconds


# The process that spawns and reaps a measured command. It must be small: on exec Linux folds the
# peak RSS of the *old* address space into the child's ru_maxrss, and with vfork (which
# subprocess and posix_spawn use) that old address space is the spawning process's own. Spawned
# from this benchmark (tens of MiB after generating an image), every child would report at least
# the benchmark's peak; spawned from a bare `python -I -S` it reports at least ~8 MiB, the floor
# printed at the start.
_LAUNCHER = """
import os, sys, time
result, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.posix_spawnp(argv[0], argv, os.environ)
_pid, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
with open(result, "w") as out:
    cpu = usage.ru_utime + usage.ru_stime
    out.write(f"{seconds!r} {os.waitstatus_to_exitcode(status)} {usage.ru_maxrss} {cpu!r}\\n")
"""


def measure(argv: Sequence[str], log: Path) -> Measurement:
    """Run `argv` to completion, stdout and stderr appended to `log`; time it, get its rusage.

    A minimal launcher spawns the command, reaps it with `os.wait4` (its own resource usage
    and that of the children it waited for, so ru_maxrss is the peak RSS of this command alone,
    or of its largest process) and times spawn-to-exit.
    """
    result = log.with_name("measure.result")
    result.unlink(missing_ok=True)
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(result), *argv]
        subprocess.run(launcher, stdin=subprocess.DEVNULL, stdout=out, stderr=out, check=True)
    seconds, returncode, maxrss, cpu = result.read_text(encoding="ascii").split()
    return Measurement(
        seconds=float(seconds),
        returncode=int(returncode),
        maxrss_kib=int(maxrss),
        cpu_seconds=float(cpu),
    )


def median_of(runs: Sequence[Run]) -> float | None:
    """Median wall time of the runs that passed their checks, or None if none did."""
    good = [run.measurement.seconds for run in runs if run.ok]
    return statistics.median(good) if good else None


# -- system helpers --------------------------------------------------------------------------


def fs_type(path: Path) -> str:
    """The file system type of the mount holding `path` (longest matching mount point)."""
    target = os.path.realpath(path)
    best, best_type = "", "unknown"
    with open("/proc/self/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) < 3:
                continue
            point = fields[1].replace("\\040", " ")
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, best_type = point, fields[2]
    return best_type


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n", encoding="ascii")


def warm_file(path: Path) -> None:
    """Read `path` once so it sits in the page cache."""
    with path.open("rb", buffering=0) as fh:
        while fh.read(_READ_BACK_CHUNK):
            pass


def discard(dev: Path) -> None:
    """Make the whole target read as zeros again (loop: punches holes in the backing file)."""
    blkdiscard = find_tool("blkdiscard") or "blkdiscard"
    subprocess.run([blkdiscard, str(dev)], check=True, capture_output=True)


def sha384_of_device(dev: Path, length: int) -> str:
    """SHA-384 of the first `length` bytes of `dev` as read from the device."""
    digest = hashlib.sha384()
    buffer = bytearray(_READ_BACK_CHUNK)
    view = memoryview(buffer)
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        remaining = length
        while remaining:
            n = os.readv(fd, [view[: min(len(view), remaining)]])
            if n == 0:
                raise OSError(f"{dev} ended {remaining} bytes early")
            digest.update(view[:n])
            remaining -= n
    finally:
        os.close(fd)
    return digest.hexdigest()


def code_state() -> str:
    """HEAD plus a fingerprint of uncommitted changes under operator/ (others edit concurrently)."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
        )
        return result.stdout.strip() if result.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    diff = git("diff", "HEAD", "--", "operator")
    if not diff:
        return f"{head} (no uncommitted changes under operator/)"
    changed = len(git("diff", "HEAD", "--name-only", "--", "operator").splitlines())
    fingerprint = hashlib.sha1(diff.encode(), usedforsecurity=False).hexdigest()[:10]
    return f"{head} + uncommitted changes in {changed} file(s) under operator/ (diff {fingerprint})"


def tool_version(argv: Sequence[str]) -> str:
    """The first line a tool prints about its version (stdout or stderr)."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except OSError as exc:
        return f"unavailable ({exc.strerror})"
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else "?"


def load_average() -> str:
    """The 1/5/15-minute load averages: other work on the machine skews wall times."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def gib_label(raw_size: int) -> str:
    """'1 GiB', '0.25 GiB', ..."""
    return f"{raw_size / GIB:g} GiB"


# -- the benchmark ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    """Where one pair of contenders (ours and native) fetches the image from.

    `suffix` names the pair's runs ("" for nginx: "ours"/"native"; "oci": "ours-oci"/...).
    With a `blob_digest` (OCI) both contenders also check the registry's sha256 digest: ours
    verifies it in its pipeline, native adds a `sha256sum` beside its `sha384sum`.
    """

    suffix: str
    source: str  # what `imagestream stream` is given: a URL or an oci:// reference
    blob_url: str  # what curl fetches
    blob_digest: str | None = None

    def kind(self, contender: str) -> str:
        """'ours', 'native-oci', ..."""
        return f"{contender}-{self.suffix}" if self.suffix else contender


@dataclass
class Bench:
    """Shared state: where things are and how runs are prepared."""

    workdir: Path
    docroot: Path
    server: Nginx
    imagestream: str
    ours_extra: tuple[str, ...]
    cold: bool
    log: Path

    def prepare(self, image: SampleImage, dev: Path | None) -> None:
        """Same starting point for every run: a discarded target and a cold (or warm) cache."""
        if dev is not None:
            discard(dev)
        if self.cold:
            drop_caches()
        else:
            os.sync()
            warm_file(image.path)

    def http_origin(self, image: SampleImage) -> Origin:
        """The image's file as nginx serves it."""
        url = self.server.url_for(image.path.name)
        return Origin(suffix="", source=url, blob_url=url)

    def ours_argv(self, image: SampleImage, dev: Path, origin: Origin) -> list[str]:
        """The command line of our pipeline."""
        return [
            self.imagestream,
            "stream",
            origin.source,
            str(dev),
            "--sha384",
            image.sha384,
            "--progress",
            "plain",
            *self.ours_extra,
        ]

    def run_ours(self, image: SampleImage, dev: Path, origin: Origin) -> Run:
        """Time our pipeline, then check the target."""
        self.prepare(image, dev)
        result = measure(self.ours_argv(image, dev, origin), self.log)
        problems: list[str] = []
        if result.returncode != 0:
            problems.append(f"exit status {result.returncode}")
        problems.extend(self.check_target(image, dev))
        return Run(origin.kind("ours"), result, image.raw_size, tuple(problems))

    def run_native(self, image: SampleImage, dev: Path, origin: Origin) -> Run:
        """Time the native shell pipeline, then check its hash files and the target."""
        expected = {"sha384sum": image.sha384}
        if origin.blob_digest is not None:
            expected["sha256sum"] = origin.blob_digest.removeprefix("sha256:")
        files = {tool: self.workdir / f"native.{tool}" for tool in expected}
        for path in files.values():
            path.unlink(missing_ok=True)
        hashers = " ".join(f">({tool} >{path})" for tool, path in files.items())
        script = (
            f"curl -s {origin.blob_url} | tee {hashers} | zstd -d "
            f"| dd of={dev} bs=4M oflag=direct conv=fsync status=none"
        )
        self.prepare(image, dev)
        result = measure(["bash", "-c", script], self.log)
        problems: list[str] = []
        if result.returncode != 0:
            problems.append(f"exit status {result.returncode}")
        for tool, path in files.items():
            # The process substitution is not waited for by bash; it ends right after tee's EOF.
            fetched = self.wait_for_digest_file(path)
            if fetched != expected[tool]:
                problems.append(f"{tool} of the fetched bytes is {fetched or 'missing'}")
        problems.extend(self.check_target(image, dev))
        return Run(origin.kind("native"), result, image.raw_size, tuple(problems))

    def run_ceiling(self, image: SampleImage) -> Run:
        """Time single-threaded decompression of the file into /dev/null."""
        self.prepare(image, None)
        argv = ["bash", "-c", f"zstd -dc {image.path} > /dev/null"]
        result = measure(argv, self.log)
        problems = [] if result.returncode == 0 else [f"exit status {result.returncode}"]
        return Run("ceiling", result, image.raw_size, tuple(problems))

    @staticmethod
    def wait_for_digest_file(path: Path) -> str | None:
        """The digest sha384sum (or sha256sum) wrote, waiting a little for it to finish."""
        deadline = time.monotonic() + _SHA_WAIT_SECONDS
        while True:
            try:
                match = _DIGEST_LINE.match(path.read_text(encoding="ascii"))
            except FileNotFoundError:
                match = None
            if match:
                return match.group(1)
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    @staticmethod
    def check_target(image: SampleImage, dev: Path) -> list[str]:
        """The first raw_size bytes of the target must hash to the raw image's SHA-384."""
        drop_caches()
        actual = sha384_of_device(dev, image.raw_size)
        if actual != image.raw_sha384:
            return [f"target hash {actual[:16]}... != raw image {image.raw_sha384[:16]}..."]
        return []


def describe_run(run: Run) -> str:
    """One line per run."""
    m = run.measurement
    line = (
        f"  {run.kind:<10} {m.seconds:7.2f} s  {run.mb_per_s:7.1f} MB/s  cpu {m.cpu_seconds:5.2f} s"
    )
    if run.kind.startswith("ours"):
        line += f"  peak RSS {m.maxrss_mib:6.1f} MiB"
    elif run.kind.startswith("native"):
        line += f"  peak RSS {m.maxrss_mib:6.1f} MiB (largest process)"
    if run.kind != "ceiling":
        line += "  target ok" if run.ok else ""
    if not run.ok:
        line += "  BROKEN: " + "; ".join(run.problems)
    return line


def push_to_registry(stack: ExitStack, workdir: Path, image: SampleImage) -> Origin:
    """Start a real docker-registry and push the image as a one-layer artifact (as oras does).

    The registry stores blobs as plain files under the work directory, so dropping the page
    cache makes it read the blob from disk like nginx does.
    """
    registry = stack.enter_context(Registry(workdir / "registry"))
    pushed = OciPusher(registry).push_artifact(OCI_REPOSITORY, OCI_TAG, [Layer(image.path)])
    digest = pushed.layers[image.path.name].digest
    return Origin(
        suffix="oci",
        source=registry.reference(OCI_REPOSITORY, tag=OCI_TAG),
        blob_url=f"{registry.base_url}/v2/{OCI_REPOSITORY}/blobs/{digest}",
        blob_digest=digest,
    )


def make_image(docroot: Path, raw_size: int, seed: int) -> SampleImage:
    """Generate the sample image into the docroot, and say how long it took."""
    name = f"image-{raw_size // MIB}MiB-seed{seed}.raw.zst"
    print(f"generating {name} ({gib_label(raw_size)} raw, zstd level 3) ...", flush=True)
    start = time.perf_counter()
    image = write_sample_image(docroot / name, raw_size, seed=seed, level=3)
    print(
        f"  {image.compressed_size / MIB:.1f} MiB compressed "
        f"(ratio {image.raw_size / image.compressed_size:.2f}), "
        f"{time.perf_counter() - start:.1f} s",
        flush=True,
    )
    return image


def verdict(ok: bool) -> str:
    """'meets' or 'BELOW BAR'."""
    return "meets" if ok else "BELOW BAR"


def speedup(runs: dict[str, list[Run]], kind: str, over: str) -> float | None:
    """Throughput of `kind` relative to `over`: median time of `over` / median time of `kind`."""
    mine, theirs = median_of(runs[kind]), median_of(runs[over])
    return theirs / mine if mine and theirs else None


def fmt_ratio(value: float | None) -> str:
    """'1.35x' or 'n/a'."""
    return "n/a" if value is None else f"{value:.2f}x"


def fmt_seconds(value: float | None) -> str:
    """'2.95 s' or 'n/a'."""
    return "n/a" if value is None else f"{value:.2f} s"


def fmt_rate(raw_size: int, seconds: float | None) -> str:
    """Output MB/s for a median time."""
    return "n/a" if seconds is None else f"{raw_size / MB / seconds:.1f}"


def make_workdir(tmp_dir: str, stack: ExitStack) -> Path:
    """A temp dir on a disk file system (never RAM), removed when `stack` closes."""
    base = Path(tmp_dir)
    base_fs = fs_type(base)
    if base_fs in {"tmpfs", "ramfs"}:
        raise SystemExit(
            f"{base} is on {base_fs}: the image and loop backing files would live in RAM; "
            "pass --tmp-dir on a disk file system"
        )
    workdir = Path(tempfile.mkdtemp(prefix="imagestream-bench-", dir=base))
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    return workdir


def print_setup(
    args: argparse.Namespace, workdir: Path, imagestream: str, code: str, log: Path
) -> None:
    """The header: machine, versions, the code measured, and what each contender runs."""
    print("== imagestream pipeline benchmark (DESIGN.md §6) ==")
    print(f"host      {platform.node()}  Linux {platform.release()}  {os.cpu_count()} CPUs")
    print(f"python    {platform.python_version()}  zstandard {zstandard.__version__}")
    print(f"code      {code}")
    print(f"tools     {tool_version(['nginx', '-v'])}; {tool_version(['zstd', '--version'])}")
    print(f"          {tool_version(['curl', '--version'])}")
    print(f"workdir   {workdir} ({fs_type(workdir)}; /tmp is {fs_type(Path('/tmp'))})")
    cache_mode = (
        "cold: page cache dropped before every run (image read from disk by nginx / zstd)"
        if args.cache == "cold"
        else "warm: image kept in the page cache for every run"
    )
    print(f"cache     {cache_mode}")
    print("target    loop device on a sparse file, blkdiscard-ed before every run")
    print(f"ours      {imagestream} stream URL DEV --sha384 HEX --progress plain", end="")
    print(f" {' '.join(args.ours_arg)}" if args.ours_arg else "")
    print("native    curl -s URL | tee >(sha384sum >FILE) | zstd -d | dd of=DEV bs=4M ", end="")
    print("oflag=direct conv=fsync status=none")
    print("ceiling   zstd -dc FILE > /dev/null")
    if args.oci:
        print(f"ours-oci  {imagestream} stream oci://REGISTRY/{OCI_REPOSITORY}:{OCI_TAG} DEV ...")
        print("native-oci curl -s BLOB_URL | tee >(sha384sum >FILE) >(sha256sum >FILE) ", end="")
        print("| zstd -d | dd ...")
    floor = measure(["true"], log).maxrss_mib
    print(f"rss floor {floor:.1f} MiB (ru_maxrss of `true` through the launcher)")
    print(flush=True)


def origins_of(bench: Bench, image: SampleImage, oci: bool, stack: ExitStack) -> list[Origin]:
    """nginx, and with `oci` a registry holding the same file."""
    origins = [bench.http_origin(image)]
    if oci:
        start = time.perf_counter()
        origins.append(push_to_registry(stack, bench.workdir, image))
        print(f"registry  {origins[-1].source} (pushed in {time.perf_counter() - start:.1f} s)")
        print(f"          blob {origins[-1].blob_url}")
    return origins


def run_rounds(
    bench: Bench, image: SampleImage, origins: Sequence[Origin], rounds: int
) -> dict[str, list[Run]]:
    """Every contender once per round, ours and native in alternating order, on one target."""
    kinds = [origin.kind(c) for origin in origins for c in ("ours", "native")] + ["ceiling"]
    runs: dict[str, list[Run]] = {kind: [] for kind in kinds}
    with loop_device(image.raw_size + _LOOP_SLACK, bench.workdir) as dev:
        print(f"target    {dev} ({(image.raw_size + _LOOP_SLACK) / MIB:.0f} MiB)", flush=True)
        for round_no in range(rounds):
            print(f"\nround {round_no + 1}/{rounds}  (load average {load_average()})", flush=True)
            order = (bench.run_ours, bench.run_native)
            if round_no % 2:
                order = order[::-1]
            timed = [
                partial(contender, image, dev, origin) for origin in origins for contender in order
            ]
            for timed_run in (*timed, partial(bench.run_ceiling, image)):
                run = timed_run()
                runs[run.kind].append(run)
                print(describe_run(run), flush=True)
    return runs


@dataclass(frozen=True)
class Medians:
    """What the rounds come to: median times, throughput ratios, peak RSS, broken runs."""

    raw_size: int
    ours: float | None
    native: float | None
    ceiling: float | None
    ours_native: float | None
    ours_ceiling: float | None
    oci_native: float | None  # None without --oci
    rss_max: float | None  # over the runs of ours that verified
    rss_min: float | None
    broken: int

    @classmethod
    def of(cls, runs: dict[str, list[Run]], raw_size: int, oci: bool) -> Medians:
        """Reduce the runs of every contender."""
        good_rss = [r.measurement.maxrss_mib for r in runs["ours"] if r.ok]
        return cls(
            raw_size=raw_size,
            ours=median_of(runs["ours"]),
            native=median_of(runs["native"]),
            ceiling=median_of(runs["ceiling"]),
            ours_native=speedup(runs, "ours", over="native"),
            ours_ceiling=speedup(runs, "ours", over="ceiling"),
            oci_native=speedup(runs, "ours-oci", over="native-oci") if oci else None,
            rss_max=max(good_rss, default=None),
            rss_min=min(good_rss, default=None),
            broken=sum(not r.ok for kind_runs in runs.values() for r in kind_runs),
        )

    @property
    def rss_text(self) -> str:
        """'41.2 MiB' or 'n/a'."""
        return "n/a" if self.rss_max is None else f"{self.rss_max:.1f} MiB"


def print_medians(runs: dict[str, list[Run]], medians: Medians, oci: bool, log: Path) -> None:
    """Per contender median and rate, then the ratios against the bars."""
    raw_size = medians.raw_size
    print(f"\nmedians over the runs that verified ({gib_label(raw_size)} image):")
    for kind, kind_runs in runs.items():
        t = median_of(kind_runs)
        print(f"  {kind:<10} {fmt_seconds(t):>9}  {fmt_rate(raw_size, t):>7} MB/s")
    print(
        f"  ours/native  throughput ratio (native_time/our_time) {fmt_ratio(medians.ours_native)}"
        f"   bar >= {BAR_OURS_NATIVE}x"
    )
    print(
        f"  ours/ceiling throughput ratio (zstd_time/our_time)   {fmt_ratio(medians.ours_ceiling)}"
        f"   bar >= {BAR_OURS_CEILING}x"
    )
    if oci:
        print(
            f"  ours-oci/native-oci throughput ratio                 "
            f"{fmt_ratio(medians.oci_native)}   bar >= {BAR_OURS_NATIVE}x"
        )
        print(
            "  ours-oci/ours (what the registry and sha256 cost)   "
            f"{fmt_ratio(speedup(runs, 'ours-oci', over='ours'))}"
        )
    spread = ""
    if medians.rss_min is not None:
        spread = f" (runs: {medians.rss_min:.1f}..{medians.rss_max:.1f} MiB)"
    print(
        f"  ours peak RSS (max over runs)                       {medians.rss_text}"
        f"   bar <= 80 MiB{spread}"
    )
    if medians.broken:
        print(f"  {medians.broken} broken run(s) left out of the medians; see {log}")


def run_rss_sizes(
    bench: Bench, image: SampleImage, sizes: Sequence[int], seed: int
) -> dict[int, Run]:
    """Peak RSS at each size: one run of ours per size, the same way as the rounds."""
    print("\npeak RSS of ours by image size (one run each):")
    rss_by_size: dict[int, Run] = {}
    for size in sizes:
        sized = image if size == image.raw_size else make_image(bench.docroot, size, seed)
        try:
            with loop_device(size + _LOOP_SLACK, bench.workdir) as dev:
                run = bench.run_ours(sized, dev, bench.http_origin(sized))
        finally:
            if sized is not image:
                sized.path.unlink(missing_ok=True)
        rss_by_size[size] = run
        status = "target ok" if run.ok else "BROKEN: " + "; ".join(run.problems)
        print(
            f"  {gib_label(size):>9}: peak RSS {run.measurement.maxrss_mib:6.1f} MiB"
            f"   ({run.measurement.seconds:.2f} s, {run.mb_per_s:.1f} MB/s, {status})"
            f"   bar <= {BAR_RSS_MIB:.0f} MiB",
            flush=True,
        )
    return rss_by_size


_ROW = "{:<34}{:>14}  {:<12}{}"


def _bar_row(metric: str, value: float | None, bar: str, meets: Callable[[float], bool]) -> str:
    shown = fmt_ratio(value)
    return _ROW.format(metric, shown, bar, "n/a" if value is None else verdict(meets(value)))


def print_summary(
    medians: Medians, rss_by_size: dict[int, Run], runs: dict[str, list[Run]], oci: bool
) -> None:
    """The compact table: every bar of DESIGN §6 with its verdict."""
    raw_size = medians.raw_size
    print("\n== summary ==")
    print(f"{'metric':<34}{'value':>14}  {'bar':<12}verdict")
    print(_ROW.format(f"ours median ({gib_label(raw_size)})", fmt_seconds(medians.ours), "", ""))
    print(_ROW.format("native median", fmt_seconds(medians.native), "", ""))
    print(_ROW.format("ceiling median (zstd -dc)", fmt_seconds(medians.ceiling), "", ""))
    medians_t = (medians.ours, medians.native, medians.ceiling)
    rates = " | ".join(fmt_rate(raw_size, t) for t in medians_t)
    print(_ROW.format("ours MB/s | native | ceiling", rates, "", ""))
    print(
        _bar_row(
            "ours/native (throughput)",
            medians.ours_native,
            f">= {BAR_OURS_NATIVE}x",
            lambda v: v >= BAR_OURS_NATIVE,
        )
    )
    print(
        _bar_row(
            "ours/ceiling (throughput)",
            medians.ours_ceiling,
            f">= {BAR_OURS_CEILING}x",
            lambda v: v >= BAR_OURS_CEILING,
        )
    )
    rss_verdict = "n/a" if medians.rss_max is None else verdict(medians.rss_max <= BAR_RSS_MIB)
    print(
        _ROW.format(
            "ours peak RSS (bench runs)", medians.rss_text, f"<= {BAR_RSS_MIB:.0f} MiB", rss_verdict
        )
    )
    print_rss_rows(medians, rss_by_size)
    if oci:
        print(_ROW.format("ours-oci median", fmt_seconds(median_of(runs["ours-oci"])), "", ""))
        print(_ROW.format("native-oci median", fmt_seconds(median_of(runs["native-oci"])), "", ""))
        print(
            _bar_row(
                "ours-oci/native-oci (throughput)",
                medians.oci_native,
                f">= {BAR_OURS_NATIVE}x",
                lambda v: v >= BAR_OURS_NATIVE,
            )
        )
    print(_ROW.format("broken runs", str(medians.broken), "0", verdict(medians.broken == 0)))
    print(
        f"(load average at the end: {load_average()}; "
        "cpu counts exclude native's sha384sum and sha256sum)"
    )


def print_rss_rows(medians: Medians, rss_by_size: dict[int, Run]) -> None:
    """Peak RSS per image size, and whether it stays flat from the smallest to the largest."""
    for size, run in rss_by_size.items():
        rss = run.measurement.maxrss_mib
        print(
            _ROW.format(
                f"ours peak RSS, {gib_label(size)} image",
                f"{rss:.1f} MiB",
                f"<= {BAR_RSS_MIB:.0f} MiB",
                verdict(rss <= BAR_RSS_MIB and run.ok) + ("" if run.ok else " (broken)"),
            )
        )
    if len(rss_by_size) < 2:
        return
    sizes = sorted(rss_by_size)
    growth = (
        rss_by_size[sizes[-1]].measurement.maxrss_mib - rss_by_size[sizes[0]].measurement.maxrss_mib
    )
    print(
        _ROW.format(
            f"RSS growth {gib_label(sizes[0])} -> {gib_label(sizes[-1])}",
            f"{growth:+.1f} MiB",
            f"flat (±{RSS_FLAT_TOLERANCE_MIB:g})",
            verdict(abs(growth) <= RSS_FLAT_TOLERANCE_MIB),
        )
    )
    if medians.rss_min is not None and medians.rss_max is not None:
        print(
            _ROW.format(
                f"  (spread over bench runs, {gib_label(medians.raw_size)})",
                f"{medians.rss_max - medians.rss_min:.1f} MiB",
                "",
                "",
            )
        )


def run_benchmark(args: argparse.Namespace, stack: ExitStack) -> None:
    """Everything between setup and cleanup."""
    raw_size = round(args.size_gib * GIB / MIB) * MIB
    rss_sizes = [round(float(s) * GIB / MIB) * MIB for s in args.rss_sizes.split(",") if s]
    workdir = make_workdir(args.tmp_dir, stack)
    docroot = workdir / "docroot"
    docroot.mkdir()
    log = workdir / "children.log"
    imagestream = args.imagestream or str(Path(sys.executable).parent / "imagestream")
    code_at_start = code_state()
    print_setup(args, workdir, imagestream, code_at_start, log)

    image = make_image(docroot, raw_size, args.seed)
    server = stack.enter_context(Nginx(docroot, workdir / "nginx"))
    print(f"nginx     {server.url_for(image.path.name)}")
    bench = Bench(
        workdir=workdir,
        docroot=docroot,
        server=server,
        imagestream=imagestream,
        ours_extra=tuple(args.ours_arg),
        cold=args.cache == "cold",
        log=log,
    )
    runs = run_rounds(bench, image, origins_of(bench, image, args.oci, stack), args.runs)
    medians = Medians.of(runs, raw_size, args.oci)
    print_medians(runs, medians, args.oci, log)
    rss_by_size = run_rss_sizes(bench, image, rss_sizes, args.seed)
    print_summary(medians, rss_by_size, runs, args.oci)
    code_at_end = code_state()
    if code_at_end != code_at_start:
        print(f"WARNING: the code changed during the run; now {code_at_end}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line of the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-gib", type=float, default=1.0, help="raw image size (default 1)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each contender (default 3)")
    parser.add_argument(
        "--rss-sizes",
        default="1,4",
        help="comma-separated raw sizes in GiB for the peak-RSS runs (default 1,4)",
    )
    parser.add_argument(
        "--cache",
        choices=("cold", "warm"),
        default="cold",
        help="drop the page cache before every run (cold, default) or keep the image cached",
    )
    parser.add_argument("--seed", type=int, default=0, help="sample image seed (default 0)")
    parser.add_argument(
        "--tmp-dir", default="/var/tmp", help="where the temp dir goes (default /var/tmp)"
    )
    parser.add_argument(
        "--oci",
        action="store_true",
        help="also stream the image from a real docker-registry (ours-oci, native-oci)",
    )
    parser.add_argument("--imagestream", help="the imagestream executable (default: the venv's)")
    parser.add_argument(
        "--ours-arg",
        action="append",
        default=[],
        help="extra argument for `imagestream stream` (repeatable), e.g. --ours-arg=--no-direct-io",
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.size_gib <= 0:
        parser.error("--runs must be >= 1 and --size-gib > 0")
    return args


@contextmanager
def _report_interrupt() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("this benchmark needs root (loop devices, drop_caches)", file=sys.stderr)
        return 2
    tools = _TOOLS + (_OCI_TOOLS if args.oci else ())
    missing = [tool for tool in tools if find_tool(tool) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    with _report_interrupt(), ExitStack() as stack:
        run_benchmark(args, stack)
    return 0


if __name__ == "__main__":
    sys.exit(main())
