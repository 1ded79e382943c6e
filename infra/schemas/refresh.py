#!/usr/bin/env python3
"""Writes the ray.io/v1 openAPIV3Schema of KubeRay's RayCluster and RayJob CRDs here as JSON,
without their descriptions (prose only; every type, property, enum, default and pattern is kept).

    git clone https://github.com/ray-project/kuberay /tmp/kuberay
    python infra/schemas/refresh.py /tmp/kuberay v1.7.0     # the chart version kuberay.tf installs

infra/validate.py validates the rendered RayCluster and RayJob manifests against these files.
"""

import json
import subprocess
import sys
from pathlib import Path

import yaml

CRDS = "helm-chart/kuberay-operator/crds"  # what the kuberay-operator chart installs


def strip(schema):
    if isinstance(schema, dict):  # a property named "description" has a schema (dict) as its value
        return {k: strip(v) for k, v in schema.items() if not (k == "description" and isinstance(v, str))}
    return [strip(v) for v in schema] if isinstance(schema, list) else schema


def main(repo: str, ref: str) -> None:
    git = ["git", "-C", repo]  # a clone of github.com/ray-project/kuberay (bare or not)
    commit = subprocess.run([*git, "rev-parse", f"{ref}^{{commit}}"], check=True, capture_output=True, text=True).stdout.strip()
    for plural in ("rayclusters", "rayjobs"):
        path = f"{CRDS}/ray.io_{plural}.yaml"
        crd = yaml.safe_load(subprocess.run([*git, "show", f"{commit}:{path}"], check=True, capture_output=True, text=True).stdout)
        [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = {"$comment": f"ray-project/kuberay {ref} ({commit}) {path}: spec.versions[v1].schema.openAPIV3Schema, "
                              f"descriptions removed by infra/schemas/refresh.py",
                  **strip(version["schema"]["openAPIV3Schema"])}
        out = Path(__file__).with_name(f"ray.io_{plural}.v1.json")
        out.write_text(json.dumps(schema, indent=0, separators=(",", ":"), sort_keys=True) + "\n")
        print(f"{out.name}: {out.stat().st_size} bytes from {path} at {commit}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
