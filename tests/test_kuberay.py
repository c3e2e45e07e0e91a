"""cluster/kuberay/*.yaml validate against the KubeRay RayJob CRD's OpenAPI schema; and no field
is one that Kubernetes would prune silently (a key the schema does not know)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CRD = ROOT.parent / "shared" / "kuberay" / "ray.io_rayjobs.yaml"
MANIFESTS = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
pytestmark = pytest.mark.skipif(not CRD.exists(), reason=f"the RayJob CRD is not at {CRD} "
                                "(see ../shared/kuberay/README.md)")


@pytest.fixture(scope="module")
def schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Keys the structural schema does not declare: the API server would drop them."""
    if isinstance(value, dict) and "properties" in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"):
        found = []
        for key, item in value.items():
            if key in schema["properties"]:
                found += unknown_fields(item, schema["properties"][key], f"{path}.{key}")
            elif not schema.get("additionalProperties"):
                found.append(f"{path}.{key}")
        return found
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return [f for key, item in value.items()
                for f in unknown_fields(item, schema["additionalProperties"], f"{path}.{key}")]
    if isinstance(value, list) and "items" in schema:
        return [f for i, item in enumerate(value) for f in unknown_fields(item, schema["items"], f"{path}[{i}]")]
    return []


def test_there_are_manifests():
    assert {p.name for p in MANIFESTS} >= {"rayjob.yaml", "rayjob-warm-cluster.yaml"}


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_crd(manifest, schema):
    doc = yaml.safe_load(manifest.read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    jsonschema.Draft7Validator(schema).validate(doc)
    assert unknown_fields(doc, schema) == []
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("qsweep run ") and "--results " in spec["entrypoint"]
    assert "env_vars" in yaml.safe_load(spec["runtimeEnvYAML"])
    assert spec["backoffLimit"] >= 1  # re-submission is safe: resume lives in the store
    # A warm cluster is selected, or one is created; never both.
    assert ("clusterSelector" in spec) != ("rayClusterSpec" in spec)


def test_the_created_cluster_pins_gpus_and_goes_away(schema):
    spec = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["suspend"] is False
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    limits = [c["resources"]["limits"] for g in workers for c in g["template"]["spec"]["containers"]]
    assert limits and all(int(limit["nvidia.com/gpu"]) >= 1 for limit in limits)
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the CPU head drives; actors go to GPUs


def test_a_misspelt_field_is_caught(schema):
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    doc["spec"]["shutdownAfterJobFinish"] = doc["spec"].pop("shutdownAfterJobFinishes")
    doc["spec"]["backoffLimit"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(doc)
    assert unknown_fields(doc, schema) == [".spec.shutdownAfterJobFinish"]
