"""The chart's PrometheusRule: valid rules for Prometheus (`promtool check rules`), and each alert
fires when it should and not before (`promtool test rules` on synthetic series shaped like the
controller's metrics, scraped by the chart's ServiceMonitor: `job` is the metrics Service's
name, `namespace` the release's).

promtool is Prometheus' own rule checker and evaluator (Debian's `prometheus` package)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.support.chart import NAMESPACE, RELEASE, render
from tests.support.tools import require_tool

JOB = f"{RELEASE}-metrics"
SCOPE = f'job="{JOB}", namespace="{NAMESPACE}"'
VALUES = {
    "metrics": {
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True, "stalledMinutes": 15, "downMinutes": 5},
    }
}


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The PrometheusRule's groups as a Prometheus rule file."""
    (rule,) = render(VALUES).of_kind("PrometheusRule")
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool (fails under CI=true when it is missing, skips otherwise)."""
    return subprocess.run(
        [require_tool("promtool"), *args], capture_output=True, text=True, check=False, timeout=60
    )


def alert_annotations(rules_file: Path, alert: str, value: str = "") -> dict[str, str]:
    """The alert's annotations as Prometheus expands them (`$value` only)."""
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    (rule,) = [rule for group in groups for rule in group["rules"] if rule.get("alert") == alert]
    return {
        key: re.sub(r"\{\{ \$value \}\}", value, text) for key, text in rule["annotations"].items()
    }


def test_rules_are_valid_prometheus_rules(rules_file: Path) -> None:
    result = promtool("check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 rules found" in result.stdout


def test_alerts_fire_when_they_should(rules_file: Path, tmp_path: Path) -> None:
    stalled = {"severity": "warning"}
    tests: list[dict[str, Any]] = [
        {
            "interval": "1m",
            "input_series": [
                {"series": f'imagestream_streams{{phase="Failed", {SCOPE}}}', "values": "0 0 1 1"},
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "ImageStreamFailed", "exp_alerts": []},
                {
                    "eval_time": "3m",
                    "alertname": "ImageStreamFailed",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "warning"},
                            "exp_annotations": alert_annotations(
                                rules_file, "ImageStreamFailed", "1"
                            ),
                        }
                    ],
                },
            ],
        },
        {
            # A stream Running; its bytes grow for 10 minutes, then stop.
            "interval": "1m",
            "input_series": [
                {"series": f'imagestream_streams{{phase="Running", {SCOPE}}}', "values": "1x60"},
                {
                    "series": f"imagestream_bytes_written_total{{{SCOPE}}}",
                    "values": "0+1000x10 10000x50",
                },
            ],
            "alert_rule_test": [
                # The window holds no growth from minute 25, and `for` asks 15 more minutes.
                {"eval_time": "30m", "alertname": "ImageStreamStalled", "exp_alerts": []},
                {
                    "eval_time": "45m",
                    "alertname": "ImageStreamStalled",
                    "exp_alerts": [
                        {
                            "exp_labels": stalled,
                            "exp_annotations": alert_annotations(rules_file, "ImageStreamStalled"),
                        }
                    ],
                },
            ],
        },
        {
            "interval": "1m",
            # Scraped and down from minute 11; then the target disappears (no Pod) at 30.
            "input_series": [{"series": f"up{{{SCOPE}}}", "values": "1x10 0x19"}],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "ImageStreamControllerDown", "exp_alerts": []},
                {"eval_time": "14m", "alertname": "ImageStreamControllerDown", "exp_alerts": []},
                {
                    "eval_time": "20m",
                    "alertname": "ImageStreamControllerDown",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "critical",
                                "job": JOB,
                                "namespace": NAMESPACE,
                            },
                            "exp_annotations": alert_annotations(
                                rules_file, "ImageStreamControllerDown"
                            ),
                        }
                    ],
                },
                {
                    "eval_time": "50m",
                    "alertname": "ImageStreamControllerDown",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "critical",
                                "job": JOB,
                                "namespace": NAMESPACE,
                            },
                            "exp_annotations": alert_annotations(
                                rules_file, "ImageStreamControllerDown"
                            ),
                        }
                    ],
                },
            ],
        },
        {
            # Busy and healthy: nothing fires.
            "interval": "1m",
            "input_series": [
                {"series": f'imagestream_streams{{phase="Running", {SCOPE}}}', "values": "1x60"},
                {"series": f'imagestream_streams{{phase="Failed", {SCOPE}}}', "values": "0x60"},
                {"series": f"imagestream_bytes_written_total{{{SCOPE}}}", "values": "0+500x60"},
                {"series": f"up{{{SCOPE}}}", "values": "1x60"},
            ],
            "alert_rule_test": [
                {"eval_time": "59m", "alertname": name, "exp_alerts": []}
                for name in ("ImageStreamFailed", "ImageStreamStalled", "ImageStreamControllerDown")
            ],
        },
    ]
    test_file = tmp_path / "alerts_test.yaml"
    test_file.write_text(yaml.safe_dump({"rule_files": [str(rules_file)], "tests": tests}))
    result = promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr
