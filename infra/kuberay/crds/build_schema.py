"""Regenerate ``ray.io_v1.schema.json``: the KubeRay ray.io/v1 CRD schemas as one JSON Schema.

    pip install --target /tmp/k8s kubernetes==37.0.2   # models only; not a project dependency
    PYTHONPATH=/tmp/k8s python infra/kuberay/crds/build_schema.py

The Ray types (RayCluster, RayJob, RayCronJob specs) are transcribed from KubeRay's generated CRDs
(see README.md for the exact files and commits); the Kubernetes core types they embed
(``PodTemplateSpec`` for head, workers and the submitter, ``Service`` for ``headService``) are
generated from the Kubernetes API models of the official Python client (field names, nesting and
scalar types), which is what controller-gen copies into the CRDs. Every object is closed
(``additionalProperties: false``): ``kubectl apply`` validates fields strictly by default, so an
unknown or misspelt field is an error on a real cluster too.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("ray.io_v1.schema.json")

# Resource quantities: the CRDs' int-or-string with Kubernetes' quantity pattern.
QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern":
            r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"}]}
QUANTITY_FIELDS = {("V1ResourceRequirements", "limits"), ("V1ResourceRequirements", "requests"),
                   ("V1PodSpec", "overhead"), ("V1EmptyDirVolumeSource", "size_limit"),
                   ("V1ResourceFieldSelector", "divisor")}
INT32 = {"type": "integer", "minimum": -2**31, "maximum": 2**31 - 1}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# controller-gen embeds ObjectMeta reduced to these fields (x-kubernetes-embedded-resource off).
EMBEDDED_META = {"type": "object", "additionalProperties": False, "properties": {
    "annotations": STR_MAP, "finalizers": {"type": "array", "items": {"type": "string"}},
    "labels": STR_MAP, "name": {"type": "string"}, "namespace": {"type": "string"}}}


def load_models() -> Any:
    """``kubernetes.client.models`` without the client's own imports (oauthlib, urllib3...)."""
    import importlib.util

    spec = importlib.util.find_spec("kubernetes")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the Kubernetes models first: pip install --target /tmp/k8s kubernetes==37.0.2")
    root = Path(list(spec.submodule_search_locations)[0])
    for name, path in (("kubernetes", root), ("kubernetes.client", root / "client")):
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        sys.modules[name] = mod
    sys.modules["kubernetes.client"].Configuration = importlib.import_module(
        "kubernetes.client.configuration").Configuration
    return importlib.import_module("kubernetes.client.models")


def core_defs(models: Any, roots: list[str]) -> dict[str, Any]:
    defs: dict[str, Any] = {}

    def schema_of(owner: str, attr: str, t: str) -> dict[str, Any]:
        if (owner, attr) in QUANTITY_FIELDS:
            return {"type": "object", "additionalProperties": QUANTITY} if t.startswith("Dict") else QUANTITY
        if m := re.fullmatch(r"List\[(.+)\]", t):
            return {"type": "array", "items": schema_of(owner, attr, m.group(1))}
        if m := re.fullmatch(r"Dict\[str, (.+)\]", t):
            return {"type": "object", "additionalProperties": schema_of(owner, attr, m.group(1))}
        simple = {"str": {"type": "string"}, "int": {"type": "integer"}, "bool": {"type": "boolean"},
                  "float": {"type": "number"}, "datetime": {"type": "string"},
                  "object": {"anyOf": [{"type": "integer"}, {"type": "string"}]}}  # IntOrString
        if t in simple:
            return simple[t]
        visit(t)
        return {"$ref": f"#/$defs/{t}"}

    def visit(name: str) -> None:
        if name in defs:
            return
        defs[name] = {}  # cycles
        cls = getattr(models, name)
        props = {cls.attribute_map[a]: schema_of(name, a, t) for a, t in cls.openapi_types.items()}
        defs[name] = {"type": "object", "additionalProperties": False, "properties": dict(sorted(props.items()))}

    for root in roots:
        visit(root)
    for name in ("V1PodTemplateSpec", "V1Service"):
        if name in defs:
            defs[name]["properties"]["metadata"] = EMBEDDED_META
    defs["V1Service"]["properties"].pop("status", None)
    return defs


def closed(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    out = {"type": "object", "additionalProperties": False, "properties": props, **extra}
    if required:
        out["required"] = required
    return out


def ray_defs() -> dict[str, Any]:
    """The Ray part of KubeRay's CRDs (README.md: files and commits), field by field."""
    ref = lambda name: {"$ref": f"#/$defs/{name}"}  # noqa: E731
    managed_by = {"type": "string", "enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]}
    policy = {"type": "string", "enum": ["DeleteCluster", "DeleteWorkers", "DeleteSelf", "DeleteNone"]}
    credential = closed({"value": {"type": "string"}, "valueFrom": ref("V1EnvVarSource")})
    condition = closed({
        "jobDeploymentStatus": {"type": "string", "enum": ["Failed"]},
        "jobStatus": {"type": "string", "enum": ["SUCCEEDED", "FAILED"]},
        "ttlSeconds": {**INT32, "minimum": 0}},
        # x-kubernetes-validations: exactly one of jobStatus / jobDeploymentStatus
        oneOf=[{"required": ["jobStatus"], "not": {"required": ["jobDeploymentStatus"]}},
               {"required": ["jobDeploymentStatus"], "not": {"required": ["jobStatus"]}}])
    deletion_strategy = closed({
        "deletionRules": {"type": "array", "minItems": 1, "items": closed(
            {"condition": condition, "policy": policy}, ["condition", "policy"])},
        "onFailure": closed({"policy": policy}), "onSuccess": closed({"policy": policy})},
        # x-kubernetes-validations: legacy onSuccess/onFailure (both) or deletionRules, never both
        oneOf=[{"required": ["onSuccess", "onFailure"], "not": {"required": ["deletionRules"]}},
               {"required": ["deletionRules"], "not": {"anyOf": [{"required": ["onSuccess"]},
                                                                 {"required": ["onFailure"]}]}}])
    head = closed({
        "enableIngress": {"type": "boolean"}, "headService": ref("V1Service"),
        "rayStartParams": STR_MAP, "serviceType": {"type": "string"},
        "template": ref("V1PodTemplateSpec")}, ["template"])
    worker = closed({
        "groupName": {"type": "string"}, "idleTimeoutSeconds": INT32, "maxReplicas": INT32,
        "minReplicas": INT32, "numOfHosts": INT32, "rayStartParams": STR_MAP, "replicas": INT32,
        "scaleStrategy": closed({"workersToDelete": {"type": "array", "items": {"type": "string"}}}),
        "suspend": {"type": "boolean"}, "template": ref("V1PodTemplateSpec")}, ["groupName", "template"])
    cluster = closed({
        "authOptions": closed({"mode": {"type": "string", "enum": ["disabled", "token"]}}),
        "autoscalerOptions": closed({
            "env": {"type": "array", "items": ref("V1EnvVar")},
            "envFrom": {"type": "array", "items": ref("V1EnvFromSource")},
            "idleTimeoutSeconds": INT32, "image": {"type": "string"}, "imagePullPolicy": {"type": "string"},
            "resources": ref("V1ResourceRequirements"), "securityContext": ref("V1SecurityContext"),
            "upscalingMode": {"type": "string", "enum": ["Default", "Aggressive", "Conservative"]},
            "volumeMounts": {"type": "array", "items": ref("V1VolumeMount")}}),
        "enableInTreeAutoscaling": {"type": "boolean"},
        "gcsFaultToleranceOptions": closed({
            "externalStorageNamespace": {"type": "string"}, "redisAddress": {"type": "string"},
            "redisPassword": credential, "redisUsername": credential}, ["redisAddress"]),
        "headGroupSpec": head, "headServiceAnnotations": STR_MAP, "managedBy": managed_by,
        "rayVersion": {"type": "string"}, "suspend": {"type": "boolean"},
        "workerGroupSpecs": {"type": "array", "items": worker}}, ["headGroupSpec"])
    job = closed({
        "activeDeadlineSeconds": INT32, "backoffLimit": INT32, "clusterSelector": STR_MAP,
        "deletionStrategy": deletion_strategy, "entrypoint": {"type": "string"},
        "entrypointNumCpus": {"type": "number"}, "entrypointNumGpus": {"type": "number"},
        "entrypointResources": {"type": "string"}, "jobId": {"type": "string"}, "managedBy": managed_by,
        "metadata": STR_MAP, "rayClusterSpec": ref("RayClusterSpec"), "runtimeEnvYAML": {"type": "string"},
        "shutdownAfterJobFinishes": {"type": "boolean"}, "submissionMode": {"type": "string"},
        "submitterConfig": closed({"backoffLimit": INT32}), "submitterPodTemplate": ref("V1PodTemplateSpec"),
        "suspend": {"type": "boolean"}, "ttlSecondsAfterFinished": INT32})
    cron = closed({
        "jobTemplate": ref("RayJobSpec"), "schedule": {"type": "string"}, "suspend": {"type": "boolean"},
        "timeZone": {"type": "string"}}, ["jobTemplate", "schedule"])

    def top(kind: str, spec: str) -> dict[str, Any]:
        return closed({"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
                       "metadata": {"type": "object"}, "spec": ref(spec)}, ["apiVersion", "kind", "spec"])

    return {"RayClusterSpec": cluster, "RayJobSpec": job, "RayCronJobSpec": cron,
            "RayCluster": top("RayCluster", "RayClusterSpec"), "RayJob": top("RayJob", "RayJobSpec"),
            "RayCronJob": top("RayCronJob", "RayCronJobSpec")}


def main() -> None:
    models = load_models()
    core = core_defs(models, ["V1PodTemplateSpec", "V1Service", "V1EnvVar", "V1EnvFromSource",
                              "V1ResourceRequirements", "V1SecurityContext", "V1VolumeMount", "V1EnvVarSource"])
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              "$comment": "generated by infra/kuberay/crds/build_schema.py; see README.md",
              "$defs": {**ray_defs(), **dict(sorted(core.items()))}}
    OUT.write_text(json.dumps(schema, indent=1, sort_keys=False) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB, {len(schema['$defs'])} definitions)")


if __name__ == "__main__":
    main()
