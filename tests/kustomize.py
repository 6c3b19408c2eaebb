"""Render a kustomization: with kustomize itself where installed, else with the small loader below.

The loader does what ``deploy/kubernetes`` uses of kustomize and nothing
more: ``resources`` (files and directories), ``patches`` (strategic merge by
kind and name, lists merged by their key), ``namespace`` and ``images``. The
tests compare it with ``kubectl kustomize`` wherever that is installed, so it
cannot drift from kustomize unnoticed; a kustomization that uses anything
else is refused here.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]

_SUPPORTED = {"apiVersion", "kind", "resources", "patches", "namespace", "images"}
# The keys kustomize merges these lists by (Kubernetes' patchMergeKey); other lists are replaced.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": None,  # containerPort in a container, port in a Service: chosen below
}
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "IngressClass"}


def kustomize_command() -> list[str] | None:
    """The real renderer where installed: ``kustomize build`` or ``kubectl kustomize``."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render_with_kustomize(directory: Path) -> list[Manifest]:
    command = kustomize_command()
    assert command is not None
    out = subprocess.run([*command, str(directory)], capture_output=True, text=True, check=True, timeout=120)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def render(directory: Path) -> list[Manifest]:
    """The objects ``kustomize build directory`` makes, for the subset above."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(spec) - _SUPPORTED
    assert not unsupported, f"{directory}: the test's loader does not know {sorted(unsupported)}"
    objects: list[Manifest] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects.extend(render(path))
        else:
            objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    for patch_entry in spec.get("patches", []):
        assert set(patch_entry) == {"path"}, f"only strategic merge patches by path: {patch_entry}"
        for patch in yaml.safe_load_all((directory / patch_entry["path"]).read_text()):
            target = _find(objects, patch["kind"], patch["metadata"]["name"])
            merged = _merge(target, patch, parent="")
            objects[objects.index(target)] = merged
    if "namespace" in spec:
        for manifest in objects:
            if manifest["kind"] not in _CLUSTER_SCOPED:
                manifest["metadata"]["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        for container in _containers(objects):
            if container["image"] == image["name"]:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return objects


def canonical(objects: list[Manifest]) -> list[Manifest]:
    """Order-free form for comparing renders: objects by kind and name, named list items by name."""

    def normal(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: normal(item) for key, item in sorted(value.items())}
        if isinstance(value, list):
            items = [normal(item) for item in value]
            if items and all(isinstance(item, dict) and "name" in item for item in items):
                items.sort(key=lambda item: str(item["name"]))
            return items
        return value

    return sorted((normal(o) for o in objects), key=lambda o: (o["kind"], o["metadata"]["name"]))


def _find(objects: list[Manifest], kind: str, name: str) -> Manifest:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"a patch names {kind}/{name}, which the resources hold {len(matches)} times"
    return matches[0]


def _containers(objects: list[Manifest]) -> list[Manifest]:
    return [
        container
        for manifest in objects
        if manifest["kind"] in {"Deployment", "StatefulSet", "DaemonSet"}
        for container in manifest["spec"]["template"]["spec"]["containers"]
    ]


def _merge(base: Any, patch: Any, parent: str) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            merged[key] = _merge(base[key], value, key) if key in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and parent in _MERGE_KEYS:
        key = _MERGE_KEYS[parent] or ("containerPort" if any("containerPort" in p for p in patch) else "port")
        merged_list = copy.deepcopy(base)
        for item in patch:
            match = next((i for i, old in enumerate(merged_list) if old.get(key) == item.get(key)), None)
            if match is None:
                merged_list.insert(0, copy.deepcopy(item))  # kustomize puts new items first
            else:
                merged_list[match] = _merge(merged_list[match], item, parent="")
        return merged_list
    return copy.deepcopy(patch)
