"""deploy/kuberay/: valid YAML whose fields match the KubeRay CRDs, and a cluster that fits oddeye's config.

The schemas are KubeRay v1.7.0's ``RayCluster`` and ``RayJob`` CRDs (ray.io/v1), cut down by
tests/data/kuberay/prune_crd.py to the fields the manifests use; every object level still lists
all its field names, so an unknown or misspelt field fails here as ``kubectl apply
--validate=strict`` would fail it.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

from oddeye.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SCHEMAS = REPO / "tests" / "data" / "kuberay"
MANIFESTS = {"RayCluster": DEPLOY / "kuberay" / "raycluster.yaml", "RayJob": DEPLOY / "kuberay" / "rayjob.yaml"}
SCHEMA_FILES = {"RayCluster": SCHEMAS / "raycluster.schema.json", "RayJob": SCHEMAS / "rayjob.schema.json"}


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Unknown fields are errors (Kubernetes prunes them silently; strict validation rejects them)."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    return out


def _crd(kind: str) -> dict[str, Any]:
    return json.loads(SCHEMA_FILES[kind].read_text())


def _validator(kind: str) -> Any:
    return jsonschema.Draft7Validator(_strict(_crd(kind)["schema"]))


def _manifest(kind: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(MANIFESTS[kind].read_text()) if d]
    assert len(docs) == 1, f"{MANIFESTS[kind].name} should hold one document"
    return docs[0]


def _errors(kind: str, doc: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in _validator(kind).iter_errors(doc)
    ]


def _unpruned(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Places the manifest sets that the vendored schema only names (it was cut before the field was used)."""
    if schema == {}:
        return [path or "<root>"]
    out = []
    if isinstance(value, dict) and "properties" in schema:
        for k, v in value.items():
            if k in schema["properties"]:
                out += _unpruned(schema["properties"][k], v, f"{path}.{k}".lstrip("."))
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for k, v in value.items():
            out += _unpruned(schema["additionalProperties"], v, f"{path}.{k}".lstrip("."))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            out += _unpruned(schema["items"], v, f"{path}.{i}")
    return out


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_manifest_matches_the_kuberay_crd(kind: str) -> None:
    crd, doc = _crd(kind), _manifest(kind)
    assert crd["license"].startswith("Apache-2.0") and "kuberay" in crd["source"]
    assert doc["apiVersion"] == f"{crd['group']}/{crd['version']}" and doc["kind"] == kind
    assert _errors(kind, doc) == []
    stale = _unpruned(crd["schema"], doc)
    assert not stale, f"re-run tests/data/kuberay/prune_crd.py (see its docstring): schema cut above {stale}"


@pytest.mark.parametrize(
    ("kind", "path", "value", "problem"),
    [
        ("RayCluster", ["spec", "workerGroupSpecs", 0, "minReplica"], 1, "minReplica"),  # misspelt field
        ("RayCluster", ["spec", "workerGroupSpecs", 1, "replicas"], "2", "'2' is not of type 'integer'"),
        ("RayCluster", ["spec", "headGroupSpec", "rayStartParams", "num-cpus"], 0, "0 is not of type 'string'"),
        ("RayJob", ["spec", "shutdownAfterJobFinishes"], "yes", "'yes' is not of type 'boolean'"),
        ("RayJob", ["spec", "rayClusterSpec", "workerGroupSpecs", 0, "resources", "ingest"], 8, "not of type"),
    ],
)
def test_schema_rejects_what_kuberay_would(kind: str, path: list, value: Any, problem: str) -> None:
    """The check has teeth: a misspelt field, a wrong type or a missing required field is an error."""
    doc = copy.deepcopy(_manifest(kind))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = _errors(kind, doc)
    assert any(problem in e for e in errors), errors


def test_required_fields_are_enforced() -> None:
    doc = copy.deepcopy(_manifest("RayCluster"))
    del doc["spec"]["workerGroupSpecs"][0]["groupName"]
    assert any("'groupName' is a required property" in e for e in _errors("RayCluster", doc))


def _groups(cluster_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["groupName"]: g for g in cluster_spec["workerGroupSpecs"]}


def test_cluster_has_ingest_and_gpu_model_groups_from_the_oddeye_image() -> None:
    spec = _manifest("RayCluster")["spec"]
    groups = _groups(spec)
    assert float(groups["ingest"]["resources"]["ingest"]) >= 1
    assert "model" not in groups["ingest"]["resources"]
    assert float(groups["model"]["resources"]["model"]) >= 1
    model_container = groups["model"]["template"]["spec"]["containers"][0]
    assert int(model_container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert model_container["image"].endswith(":gpu")

    dockerfile = (DEPLOY / "kuberay" / "Dockerfile").read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1)
    assert spec["rayVersion"] == ray_version, "the manifest's rayVersion must be the Ray the image installs"
    assert re.search(r"^ARG BASE=oddeye:cpu$", dockerfile, re.M), "the KubeRay image builds on oddeye's image"
    images = [
        c["image"] for g in [spec["headGroupSpec"], *groups.values()] for c in g["template"]["spec"]["containers"]
    ]
    assert all(i.startswith("oddeye-kuberay:") for i in images), images


def test_rayjob_runs_oddeye_on_the_same_cluster_joining_with_address_auto() -> None:
    job = _manifest("RayJob")["spec"]
    assert job["rayClusterSpec"] == _manifest("RayCluster")["spec"], "rayjob.yaml and raycluster.yaml drifted apart"
    args = job["entrypoint"].split()
    assert args[:2] == ["oddeye", "run"]
    config_path = Path(args[2])
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == "oddeye-config")
    assert config_path.parent == Path(mount["mountPath"])
    volume = next(v for v in head["volumes"] if v["name"] == "oddeye-config")
    assert volume["configMap"]["name"] == "oddeye-config"


def test_cluster_config_places_actors_on_the_groups_the_manifest_offers(monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/cluster.yaml (the ConfigMap's oddeye.yaml) joins with `auto` and asks only for resources offered."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(DEPLOY / "cluster.yaml")
    assert cfg.ray.address == "auto"
    groups = _groups(_manifest("RayCluster")["spec"])
    offered = {g: {k: float(v) for k, v in spec["resources"].items()} for g, spec in groups.items()}
    for source in cfg.sources:
        assert source.resources == {"ingest": 1}
    ingest_units = offered["ingest"]["ingest"] * groups["ingest"]["minReplicas"]
    assert sum(getattr(s, "replicas", 1) for s in cfg.sources) <= ingest_units
    assert cfg.model.resources == {"model": 1}
    model_units = offered["model"]["model"] * groups["model"]["replicas"]
    assert cfg.model.replicas <= model_units, "every model replica needs a `model` unit on some pod"
