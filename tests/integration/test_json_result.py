"""`--progress json`: exactly one `result` object on stdout for every run past argument parsing.

Each run here goes through the real CLI (a success, each family of failure, a missing
`--sha384`, a bad value, a cancel and a planted bug) and its stdout must hold exactly one
`result` record, the last line, valid against docs/result.schema.json, with the exit code the
process really returned.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from tests.support.cli import (
    CliRun,
    imagestream_env,
    imagestream_process,
    json_records,
    run_imagestream,
)
from tests.support.nginx import Nginx
from tests.support.range_server import Fault, FaultPlan, RangeServer
from tests.support.targets import MIB
from tests.support.tools import wait_until

from imagestream.demo.image import SampleImage, write_sample_image
from imagestream.reasons import Reason

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "result.schema.json"
WRONG_HASH = "cd" * 48


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(loaded)
    return loaded


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> SampleImage:
    return write_sample_image(tmp_path_factory.mktemp("img") / "image.zst", 4 * MIB, seed=51)


def only_result(stdout: str, code: int, schema: dict[str, Any]) -> dict[str, Any]:
    """The one result record of `stdout`: last, alone of its kind, valid, with `code`."""
    records = json_records(stdout)
    results = [r for r in records if r.get("event") == "result"]
    assert len(results) == 1, stdout
    assert records[-1] is results[0], stdout
    result = results[0]
    jsonschema.validate(result, schema, cls=jsonschema.Draft202012Validator)
    assert result["exitCode"] == code
    assert result["reason"] in {reason.value for reason in Reason}
    return result


def checked(run: CliRun, schema: dict[str, Any]) -> dict[str, Any]:
    return only_result(run.stdout, run.code, schema)


def test_a_success_reports_both_hashes_and_the_counts(
    image: SampleImage, tmp_path: Path, schema: dict[str, Any]
) -> None:
    target = tmp_path / "out.img"
    run = run_imagestream(
        "stream", image.path, target, "--sha384", image.sha384.upper(), "--progress", "json"
    )
    result = checked(run, schema)
    assert (result["outcome"], result["ok"], result["reason"]) == ("Succeeded", True, "Succeeded")
    assert result["sha384"] == result["expectedSha384"] == image.sha384
    assert (result["source"], result["target"]) == (str(image.path), str(target))
    assert result["bytesFetched"] == image.compressed_size
    assert result["bytesWritten"] == image.raw_size
    assert result["compression"] == "zstd"


def test_a_hash_mismatch_reports_the_computed_hash(
    image: SampleImage, tmp_path: Path, schema: dict[str, Any]
) -> None:
    run = run_imagestream(
        "stream", image.path, tmp_path / "o.img", "--sha384", WRONG_HASH, "--progress", "json"
    )
    result = checked(run, schema)
    assert (result["outcome"], result["reason"], run.code) == ("Failed", "HashMismatch", 4)
    assert (result["sha384"], result["expectedSha384"]) == (image.sha384, WRONG_HASH)
    assert result["bytesFetched"] == image.compressed_size


def test_a_source_failure_redacts_the_source(
    nginx: Nginx, tmp_path: Path, schema: dict[str, Any]
) -> None:
    url = nginx.url_for("missing.zst").replace("http://", "http://user:secret@") + "?token=t0k"
    run = run_imagestream(
        "stream", url, tmp_path / "o.img", "--sha384", WRONG_HASH, "--progress", "json"
    )
    result = checked(run, schema)
    assert (result["reason"], run.code) == ("HTTPError", 3)
    assert "secret" not in result["source"]
    assert "t0k" not in result["source"]
    assert result["sha384"] is None


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        ((), "--sha384 is required"),
        (("--sha384", "xyz"), "--sha384"),
        (("--sha384", WRONG_HASH, "--max-retries", "-1"), "--max-retries"),
    ],
    ids=["missing-sha384", "bad-sha384", "bad-value"],
)
def test_usage_errors_have_a_result(
    args: tuple[str, ...], phrase: str, image: SampleImage, tmp_path: Path, schema: dict[str, Any]
) -> None:
    run = run_imagestream("stream", image.path, tmp_path / "o.img", *args, "--progress", "json")
    result = checked(run, schema)
    assert (result["outcome"], result["reason"], run.code) == ("Failed", "InvalidRequest", 2)
    assert phrase in result["message"]
    assert not (tmp_path / "o.img").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_cancel_has_a_result(
    sig: signal.Signals, image: SampleImage, tmp_path: Path, schema: dict[str, Any]
) -> None:
    """SIGHUP (the ssh session went away) stops the stream as SIGTERM does."""
    plan = FaultPlan([Fault.status(503, retry_after="300")])
    with RangeServer(image.path, faults=plan) as server:
        args = ("stream", server.url, tmp_path / "o.img", "--sha384", WRONG_HASH)
        with imagestream_process(*args, "--progress", "json") as process:
            wait_until(lambda: bool(server.requests), 20, what="a request")
            time.sleep(0.5)  # waiting out the 300 s it was asked to
            process.send_signal(sig)
            stdout, stderr = process.communicate(timeout=30)
    result = only_result(stdout, 130, schema)
    assert (result["outcome"], result["reason"]) == ("Cancelled", "Cancelled")
    assert "nothing was written, the target is unchanged" in result["message"]
    assert "Traceback" not in stderr


# The CLI's own main() with a bug planted where the stream would run (as test_cli_errors does).
_WITH_A_BUG = """
import sys
import imagestream.cli as cli

def stream_target(*args, **kwargs):
    raise KeyError("no such key")

cli.stream_target = stream_target
sys.exit(cli.main(sys.argv[1:]))
"""


def test_an_internal_error_has_a_result(
    image: SampleImage, tmp_path: Path, schema: dict[str, Any]
) -> None:
    args = ["stream", str(image.path), str(tmp_path / "o"), "--sha384", image.sha384]
    proc = subprocess.run(
        [sys.executable, "-c", _WITH_A_BUG, *args, "--progress", "json"],
        capture_output=True,
        text=True,
        env=imagestream_env(),
        timeout=30,
        check=False,
    )
    assert proc.returncode == 70, proc.stderr
    result = only_result(proc.stdout, 70, schema)
    assert result["reason"] == "InternalError"


def test_the_readme_documents_every_field(schema: dict[str, Any]) -> None:
    readme = (SCHEMA_PATH.parents[1] / "README.md").read_text()
    section = readme.split("### Machine-readable output", 1)[1].split("\n## ", 1)[0]
    for name in schema["properties"]:
        assert f"`{name}`" in section, name


def test_the_demo_has_the_same_result(schema: dict[str, Any]) -> None:
    run = run_imagestream("demo", "--size-mib", "4", "--progress", "json")
    result = checked(run, schema)
    assert result["outcome"] == "Succeeded"
    assert str(result["source"]).startswith("http://127.0.0.1:")
    assert result["sha384"] == result["expectedSha384"]
