"""deploy/imagestream-operator.yaml, the plain-manifest install, is the chart rendered by
scripts/render-deploy.py: current, ordered for `kubectl apply -f`, and valid for Kubernetes."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import kubernetes_validate
import pytest
import yaml
from tests.support.chart import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "render-deploy.py"
MANIFEST = REPO_ROOT / "deploy" / "imagestream-operator.yaml"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    """scripts/render-deploy.py as a module."""
    spec = importlib.util.spec_from_file_location("render_deploy", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_manifest_is_current(script: ModuleType) -> None:
    assert MANIFEST.read_text(encoding="utf-8") == script.render_manifest(), (
        "deploy/imagestream-operator.yaml is stale: run scripts/render-deploy.py and commit it"
    )


def test_check_fails_on_a_stale_manifest(script: ModuleType, tmp_path: Path) -> None:
    stale = tmp_path / "imagestream-operator.yaml"
    stale.write_text(MANIFEST.read_text(encoding="utf-8").replace("replicas: 1", "replicas: 2"))
    assert script.main(["--check", "--output", str(stale)]) == 1
    assert script.main(["--output", str(stale)]) == 0
    assert script.main(["--check", "--output", str(stale)]) == 0


def test_plain_manifest_creates_namespaces_and_crd_first() -> None:
    docs = [doc for doc in yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")) if doc]
    kinds = [doc["kind"] for doc in docs]
    assert kinds[0] == "Namespace"
    namespace = docs[0]["metadata"]
    assert namespace["name"] == "imagestream-system"
    assert namespace["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    crd = kinds.index("CustomResourceDefinition")
    assert all(kind in ("Namespace", "ServiceAccount") for kind in kinds[:crd]), (
        "namespaced objects before the CRD are only ServiceAccounts"
    )
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
