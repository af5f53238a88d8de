"""Cut a KubeRay CRD's OpenAPI schema down to what oddeye's manifests use, for tests/test_kuberay_manifests.py.

Run it again whenever a manifest in deploy/kuberay/ starts using a field it did not use before
(the test says so), with the CRDs of the KubeRay release the manifests target::

    V=v1.7.0; B=https://raw.githubusercontent.com/ray-project/kuberay/$V/ray-operator/config/crd/bases
    curl -LO $B/ray.io_rayclusters.yaml -LO $B/ray.io_rayjobs.yaml
    python tests/data/kuberay/prune_crd.py ray.io_rayclusters.yaml deploy/kuberay/raycluster.yaml \\
        --source "$B/ray.io_rayclusters.yaml" > tests/data/kuberay/raycluster.schema.json
    python tests/data/kuberay/prune_crd.py ray.io_rayjobs.yaml deploy/kuberay/rayjob.yaml \\
        --source "$B/ray.io_rayjobs.yaml" > tests/data/kuberay/rayjob.schema.json

Every object level keeps the names of all its properties, so a misspelt or unknown field is
still caught; the full schema (types, enums, required fields) is kept only below the
properties the manifests set. Descriptions, defaults and CEL rules are dropped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

KEEP = (
    "type",
    "required",
    "enum",
    "format",
    "nullable",
    "anyOf",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
)


def prune(schema: dict[str, Any], values: list[Any]) -> dict[str, Any]:
    """The parts of ``schema`` that validate ``values`` (every value the manifests put at this place)."""
    if not values:
        return {}
    out = {k: schema[k] for k in KEEP if k in schema}
    if "properties" in schema:
        dicts = [v for v in values if isinstance(v, dict)]
        props = sorted(schema["properties"].items())
        out["properties"] = {name: prune(sub, [d[name] for d in dicts if name in d]) for name, sub in props}
    if isinstance(schema.get("items"), dict):
        out["items"] = prune(schema["items"], [x for v in values if isinstance(v, list) for x in v])
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        used = [x for v in values if isinstance(v, dict) for x in v.values()]
        out["additionalProperties"] = prune(extra, used) if used else {k: extra[k] for k in KEEP if k in extra}
    elif isinstance(extra, bool):
        out["additionalProperties"] = extra
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("crd", type=Path, help="the full CustomResourceDefinition YAML")
    p.add_argument("manifests", type=Path, nargs="+", help="manifests of that kind whose fields to keep")
    p.add_argument("--version", default="v1", help="the CRD version to take (default v1)")
    p.add_argument("--source", default="", help="where the CRD came from (recorded in the output)")
    args = p.parse_args(argv)

    crd = yaml.safe_load(args.crd.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == args.version)
    kind = crd["spec"]["names"]["kind"]
    docs = [d for m in args.manifests for d in yaml.safe_load_all(m.read_text()) if d and d.get("kind") == kind]
    if not docs:
        raise SystemExit(f"no {kind} in {', '.join(map(str, args.manifests))}")
    out = {
        "source": args.source,
        "license": "Apache-2.0 (KubeRay, https://github.com/ray-project/kuberay/blob/master/LICENSE)",
        "note": "Pruned by tests/data/kuberay/prune_crd.py to the fields oddeye's manifests use.",
        "group": crd["spec"]["group"],
        "version": args.version,
        "kind": kind,
        "schema": prune(version["schema"]["openAPIV3Schema"], docs),
    }
    json.dump(out, sys.stdout, indent=1, sort_keys=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
