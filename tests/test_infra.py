"""Cluster infrastructure: ray_cluster*.yaml, KubeRay manifests, image, MLflow server.

Everything here is static or runs a shell script with a stub: no cluster, no network, seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from wadi_core.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "ray_cluster.yaml"
CLUSTER_SPOT_YAML = ROOT / "ray_cluster_spot.yaml"  # elastic training on spot nodes
CLUSTER_FILES = [CLUSTER_YAML, CLUSTER_SPOT_YAML]
KUBERAY = ROOT / "infra" / "kuberay"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
MLFLOW = ROOT / "infra" / "mlflow"
CLUSTER_DOC = ROOT / "docs" / "CLUSTER.md"
IMAGE_REPO = "registry.example.com/wadi/wadi"

# vCPUs and GPUs of the EC2 types used; the autoscaler trusts the declared resources.
EC2_SPECS = {"p4d.24xlarge": (96, 8), "p5.48xlarge": (192, 8), "g5.12xlarge": (48, 4),
             "m6i.4xlarge": (16, 0)}
TRAINING_TYPES = {"p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge", "p5e.48xlarge", "p5en.48xlarge"}

# KubeRay's ray.io/v1 CRD schemas (vendored, infra/kuberay/crds/README.md): unknown fields and
# wrong types fail here as they fail `kubectl apply` (strict field validation) on a cluster.
CRD_SCHEMA = KUBERAY / "crds" / "ray.io_v1.schema.json"


def pinned(package: str) -> str:
    """Version of ``package`` pinned in constraints.txt."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(rf"^{re.escape(package)}==([\w.]+)", line.strip())
        if m:
            return m.group(1)
    raise AssertionError(f"{package} is not pinned in constraints.txt")


# ---------------------------------------------------------------- ray_cluster.yaml


@pytest.fixture(scope="module")
def cluster_cfg() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module", params=CLUSTER_FILES, ids=[p.name for p in CLUSTER_FILES])
def any_cluster_cfg(request: pytest.FixtureRequest) -> dict:
    """Each cluster launcher config: the on-demand one and its spot variant."""
    return yaml.safe_load(request.param.read_text())


def validate_cluster(cfg: dict) -> None:
    """What `ray up` does before touching AWS: merge defaults, then Ray's own schema check.

    A private Ray module, imported plainly: a Ray that moves it fails these tests loudly instead
    of turning them into skips (update the import to where `ray up` validates now)."""
    from ray.autoscaler._private import util
    util.validate_config(util.prepare_config(copy.deepcopy(cfg)))


def test_cluster_config_passes_rays_own_validation(any_cluster_cfg: dict) -> None:
    validate_cluster(any_cluster_cfg)


@pytest.mark.parametrize("path, typo", [
    (("max_workers",), "max_wokers"),
    (("idle_timeout_minutes",), "idle_timeout_minute"),
    (("worker_start_ray_commands",), "worker_start_ray_command"),
    (("docker", "pull_before_run"), "pull_before_runn"),
    (("available_node_types", "gpu_a100_x8", "min_workers"), "min_worker"),
    (("available_node_types", "head", "resources"), "resource"),
])
def test_misspelled_cluster_key_fails_validation(cluster_cfg: dict, path: tuple, typo: str) -> None:
    import jsonschema  # a dev dependency (pyproject.toml): missing is an error, not a skip
    bad = copy.deepcopy(cluster_cfg)
    parent = bad
    for key in path[:-1]:
        parent = parent[key]
    parent[typo] = parent.pop(path[-1])
    with pytest.raises(jsonschema.ValidationError, match=typo):
        validate_cluster(bad)


def test_head_runs_no_training_work(any_cluster_cfg: dict) -> None:
    head = any_cluster_cfg["available_node_types"][any_cluster_cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")


def is_spot(node_type: dict) -> bool:
    return node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"


def training_types(cfg: dict) -> dict[str, dict]:
    return {name: s for name, s in cfg["available_node_types"].items()
            if s["node_config"]["InstanceType"] in TRAINING_TYPES}


def test_worker_types_declare_their_real_hardware(any_cluster_cfg: dict) -> None:
    cfg = any_cluster_cfg
    for name, spec in cfg["available_node_types"].items():
        if name == cfg["head_node_type"]:
            continue
        cpus, gpus = EC2_SPECS[spec["node_config"]["InstanceType"]]
        assert spec["resources"]["CPU"] == cpus and spec["resources"].get("GPU", 0) == gpus, name
        assert 0 <= spec.get("min_workers", 0) <= spec["max_workers"] <= cfg["max_workers"]
    training = training_types(cfg).values()
    assert training and all(s["resources"]["GPU"] == 8 for s in training)


def test_on_demand_cluster_trains_on_demand_and_evaluates_on_spot(cluster_cfg: dict) -> None:
    types = cluster_cfg["available_node_types"]
    assert not any(is_spot(s) for s in training_types(cluster_cfg).values()), "training on spot"
    spot = [s for s in types.values() if is_spot(s)]
    assert spot and all(s["resources"].get("GPU", 0) > 0 for s in spot), "no spot GPU eval type"


def _check_boto_shape(value: Any, shape: Any, where: str) -> None:
    if shape.type_name == "structure":
        assert isinstance(value, dict), where
        unknown = set(value) - set(shape.members)
        assert not unknown, f"{where}: not RunInstances parameters: {sorted(unknown)}"
        for key, sub in value.items():
            _check_boto_shape(sub, shape.members[key], f"{where}.{key}")
    elif shape.type_name == "list":
        for i, item in enumerate(value):
            _check_boto_shape(item, shape.member, f"{where}[{i}]")
    elif shape.type_name == "string" and getattr(shape, "enum", None):
        assert value in shape.enum, f"{where}: {value!r} not one of EC2's values"


def test_node_configs_are_valid_run_instances_parameters(any_cluster_cfg: dict) -> None:
    """Ray passes node_config to EC2 RunInstances unchecked; check it against botocore's model."""
    botocore_session = pytest.importorskip("botocore.session")
    shape = (botocore_session.get_session().get_service_model("ec2")
             .operation_model("RunInstances").input_shape)
    for name, spec in any_cluster_cfg["available_node_types"].items():
        _check_boto_shape(spec["node_config"], shape, name)


def test_cluster_uses_project_image_and_installs_nothing(any_cluster_cfg: dict) -> None:
    cluster_cfg = any_cluster_cfg
    assert image_tag_ok(cluster_cfg["docker"]["image"])
    commands = [c for k in ("setup_commands", "head_setup_commands", "worker_setup_commands")
                for c in cluster_cfg.get(k, [])]
    assert not any("pip install" in c for c in commands), "the image holds the environment"
    # The env file that `docker run --env-file` reads is fetched in the cluster's own region.
    (fetch,) = cluster_cfg["initialization_commands"]
    assert f"--region {cluster_cfg['provider']['region']} " in fetch
    assert any(o.startswith("--env-file ") for o in cluster_cfg["docker"]["run_options"])


# ---------------------------------------------------------------- image tags and Dockerfile


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M))


def image_tag_ok(image: str) -> bool:
    """The project image, tagged ray<pinned ray>-py311-<the Dockerfile's CUDA tag>."""
    args = dockerfile_args()
    return image == f"{IMAGE_REPO}:ray{pinned('ray')}-py311-{args['CUDA_TAG']}"


def test_dockerfile_base_install_user_and_no_weights() -> None:
    text = DOCKERFILE.read_text()
    args = dockerfile_args()
    assert args["RAY_VERSION"] == pinned("ray")
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms == ["rayproject/ray:${RAY_VERSION}-py311-${CUDA_TAG}"]
    assert re.fullmatch(r"cu1\d{2}", args["CUDA_TAG"])
    assert args["TORCH_INDEX_URL"].rstrip("/").endswith("/" + args["CUDA_TAG"]), \
        "torch's CUDA index must match the base image's CUDA"
    runs = " ".join(re.findall(r"^RUN (.+?)(?<!\\)$", text.replace("\\\n", " "), re.M))
    installs = re.findall(r"pip install[^&;]*", runs)
    assert installs and all("-c constraints.txt" in i for i in installs)
    assert "torch" in installs[0] and "${TORCH_INDEX_URL}" in installs[0]
    for pattern in ("from_pretrained", "hf_hub_download", "huggingface-cli", "snapshot_download",
                    "wget ", "curl "):
        assert pattern not in runs, f"weights must not be baked in ({pattern})"
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    for entry in (".git", ".venv", "runs", "mlruns", "mlflow.db", "**/.env"):
        assert entry in ignore, f"{entry} missing from Dockerfile.dockerignore"


# ---------------------------------------------------------------- KubeRay manifests


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest_files() -> list[Path]:
    return sorted(KUBERAY.glob("*.yaml")) + sorted((MLFLOW / "k8s").glob("*.yaml"))


def all_objects() -> Iterator[tuple[Path, dict]]:
    """Every Kubernetes object, including RayJobs embedded in ConfigMaps."""
    for path in manifest_files():
        for doc in load_docs(path):
            yield path, doc
            if doc["kind"] == "ConfigMap":
                for text in doc.get("data", {}).values():
                    inner = yaml.safe_load(text)
                    if isinstance(inner, dict) and "apiVersion" in inner:
                        yield path, inner


def rayjob_specs() -> Iterator[tuple[str, dict]]:
    for path, obj in all_objects():
        if obj["kind"] == "RayJob":
            yield f"{path.name}:RayJob", obj["spec"]
        elif obj["kind"] == "RayCronJob":
            yield f"{path.name}:RayCronJob", obj["spec"]["jobTemplate"]


def test_manifests_parse_and_have_identity() -> None:
    files = manifest_files()
    assert {p.name for p in files} >= {"raycluster.yaml", "rayjob-distill.yaml", "rayjob-distill-spot.yaml",
                                       "raycronjob-evaluate.yaml", "cronjob-evaluate.yaml"}
    kinds = set()
    for path, obj in all_objects():
        assert obj.get("apiVersion") and obj.get("kind"), path
        meta = obj.get("metadata", {})
        assert meta.get("name") or meta.get("generateName"), f"{path}: unnamed {obj['kind']}"
        kinds.add((obj["apiVersion"], obj["kind"]))
    assert kinds >= {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"),
                     ("ray.io/v1", "RayCronJob"), ("batch/v1", "CronJob")}


def pod_templates(cluster_spec: dict) -> Iterator[tuple[str, dict]]:
    yield "head", cluster_spec["headGroupSpec"]["template"]["spec"]
    for group in cluster_spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


def check_ray_cluster_spec(spec: dict, where: str, service_accounts: set[str]) -> None:
    assert spec["rayVersion"] == pinned("ray"), where
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: head must run no work"
    for group in [head, *spec.get("workerGroupSpecs", [])]:
        # `ray start` flags; KubeRay rejects non-string values.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), where
    for group in spec.get("workerGroupSpecs", []):
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], \
            f"{where}/{group['groupName']}: minReplicas <= replicas <= maxReplicas does not hold"
    groups = list(pod_templates(spec))
    assert any("nvidia.com/gpu" in str(pod) for _, pod in groups), f"{where}: no GPU group"
    for name, pod in groups:
        assert pod.get("serviceAccountName") in service_accounts, f"{where}/{name}"
        for c in pod["containers"]:
            assert image_tag_ok(c["image"]), f"{where}/{name}: image {c['image']}"
            secrets = {e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e}
            assert {"wadi-s3", "wadi-mlflow"} <= secrets, f"{where}/{name}: env from secrets"
            limits = c["resources"].get("limits", {})
            if "nvidia.com/gpu" in limits:
                assert c["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
                assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), \
                    f"{where}/{name}: GPU pod without nvidia.com/gpu toleration"


def test_ray_objects_versions_images_gpus_and_secrets() -> None:
    service_accounts = {o["metadata"]["name"] for _, o in all_objects() if o["kind"] == "ServiceAccount"}
    checked = 0
    for path, obj in all_objects():
        if obj["kind"] == "RayCluster":
            check_ray_cluster_spec(obj["spec"], f"{path.name}:RayCluster", service_accounts)
            checked += 1
    workdir = re.findall(r"^WORKDIR (\S+)", DOCKERFILE.read_text(), re.M)[-1]
    for where, spec in rayjob_specs():
        assert spec.get("submissionMode", "K8sJobMode") in {"K8sJobMode", "HTTPMode", "InteractiveMode"}
        # Code from the image: no working_dir upload, the entrypoint runs in the image's project dir.
        assert "working_dir" not in yaml.safe_load(spec.get("runtimeEnvYAML") or "{}"), where
        assert spec["entrypoint"].startswith(f"cd {workdir} && python jobs/"), where
        check_ray_cluster_spec(spec["rayClusterSpec"], where, service_accounts)
        checked += 1
    assert checked >= 4


# ---------------------------------------------------------------- KubeRay CRD schema


def rayservice_defs() -> dict[str, Any]:
    """KubeRay's RayService, closed like the vendored types and built on them (RayClusterSpec, V1Service):
    ``RayServiceSpec`` of github.com/ray-project/kuberay ``ray-operator/apis/ray/v1/rayservice_types.go`` at
    ``834fe3a876c5b5631ffc2e33f82dca3a6f31137d`` (newer fields such as ``upgradeStrategy`` are reported as unknown)."""
    int32 = {"type": "integer", "minimum": -2**31, "maximum": 2**31 - 1}
    spec = {"type": "object", "additionalProperties": False, "properties": {
        "serveConfigV2": {"type": "string"}, "rayClusterConfig": {"$ref": "#/$defs/RayClusterSpec"},
        "serviceUnhealthySecondThreshold": int32, "deploymentUnhealthySecondThreshold": int32,
        "serveService": {"$ref": "#/$defs/V1Service"}}}
    top = {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "spec"], "properties": {
        "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayService"}, "metadata": {"type": "object"},
        "spec": {"$ref": "#/$defs/RayServiceSpec"}}}
    return {"RayServiceSpec": spec, "RayService": top}


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, Any]:
    jsonschema = pytest.importorskip("jsonschema")
    defs = json.loads(CRD_SCHEMA.read_text())["$defs"]
    defs = {**defs, **rayservice_defs()}
    out = {}
    for kind in ("RayCluster", "RayJob", "RayCronJob", "RayService"):
        schema = {"$defs": defs, "$ref": f"#/$defs/{kind}"}
        jsonschema.Draft202012Validator.check_schema(schema)
        out[kind] = jsonschema.Draft202012Validator(schema)
    return out


def ray_objects() -> list[tuple[str, dict]]:
    return [(f"{p.name}:{o['kind']}", o) for p, o in all_objects() if o["apiVersion"] == "ray.io/v1"]


def schema_errors(validators: dict[str, Any], obj: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validators[obj["kind"]].iter_errors(obj)]


def test_crd_schema_is_vendored_with_its_provenance() -> None:
    readme = (CRD_SCHEMA.parent / "README.md").read_text()
    assert "ray-project/kuberay" in readme and "ray-operator/config/crd/bases/" in readme
    defs = json.loads(CRD_SCHEMA.read_text())["$defs"]
    assert {"RayCluster", "RayJob", "RayCronJob", "V1PodTemplateSpec", "V1Container"} <= set(defs)


def test_ray_manifests_match_kuberays_crd_schema(crd_validators: dict) -> None:
    objects = ray_objects()
    assert {o["kind"] for _, o in objects} == {"RayCluster", "RayJob", "RayCronJob", "RayService"}
    bad = {where: errs for where, o in objects if (errs := schema_errors(crd_validators, o))}
    assert not bad, bad


def _first(kind: str) -> dict:
    return copy.deepcopy(next(o for _, o in ray_objects() if o["kind"] == kind))


def _pod(obj: dict, group: int = 0) -> dict:
    spec = obj["spec"]["jobTemplate"] if obj["kind"] == "RayCronJob" else obj["spec"]
    cluster = spec if obj["kind"] == "RayCluster" else spec["rayClusterSpec"]
    return cluster["workerGroupSpecs"][group]["template"]["spec"]


def _mutations() -> list[tuple[str, str, Any]]:
    """(kind, what, mutate(obj)) cases that a real API server rejects."""
    def rename(path: list, old: str, new: str):
        def f(obj: dict) -> None:
            d = obj
            for k in path:
                d = d[k]
            d[new] = d.pop(old)
        return f

    def set_(getter, key: str, value: Any):
        def f(obj: dict) -> None:
            getter(obj)[key] = value
        return f

    return [
        ("RayJob", "misspelt spec field", rename(["spec"], "activeDeadlineSeconds", "activeDeadlineSecond")),
        ("RayJob", "unknown top-level spec field", set_(lambda o: o["spec"], "workingDir", "/home/ray/wadi")),
        ("RayJob", "string for an integer", set_(lambda o: o["spec"], "backoffLimit", "2")),
        ("RayJob", "unknown deletion policy", lambda o: o["spec"]["deletionStrategy"]["deletionRules"][0]
         .update(policy="DeleteEverything")),
        ("RayJob", "rules and legacy policies together", lambda o: o["spec"]["deletionStrategy"]
         .update(onSuccess={"policy": "DeleteCluster"}, onFailure={"policy": "DeleteCluster"})),
        ("RayJob", "misspelt worker group field", rename(["spec", "rayClusterSpec", "workerGroupSpecs", 0],
                                                         "maxReplicas", "maxReplica")),
        ("RayJob", "misspelt pod field", lambda o: _pod(o).update(nodeSelecter=_pod(o).pop("nodeSelector"))),
        ("RayJob", "misspelt toleration field", lambda o: _pod(o)["tolerations"][0].update(efect="NoSchedule")),
        ("RayJob", "integer for a string map value", lambda o: _pod(o)["nodeSelector"].update(gpus=8)),
        ("RayJob", "bad GPU quantity", lambda o: _pod(o)["containers"][0]["resources"]["limits"]
         .update({"nvidia.com/gpu": "eight"})),
        ("RayCluster", "misspelt cluster field", rename(["spec"], "enableInTreeAutoscaling",
                                                        "enableInTreeAutoScaling")),
        ("RayCluster", "list for a string map", set_(lambda o: o["spec"]["headGroupSpec"], "rayStartParams",
                                                      ["num-cpus=0"])),
        ("RayCronJob", "misspelt cron field", rename(["spec"], "timeZone", "timezone")),
        ("RayCronJob", "missing schedule", lambda o: o["spec"].pop("schedule")),
        ("RayCronJob", "misspelt job template field", rename(["spec", "jobTemplate"], "entrypoint", "entrypont")),
    ]


@pytest.mark.parametrize("kind, what, mutate", _mutations(), ids=[m[1] for m in _mutations()])
def test_crd_schema_rejects_wrong_manifests(crd_validators: dict, kind: str, what: str, mutate: Any) -> None:
    obj = _first(kind)
    assert not schema_errors(crd_validators, obj)
    mutate(obj)
    assert schema_errors(crd_validators, obj), f"{what} passed the schema"


# ---------------------------------------------------------------- RayService of the student (jobs/serve.py)


def _rayservice() -> dict:
    return copy.deepcopy(next(o for _, o in ray_objects() if o["kind"] == "RayService"))


def test_student_rayservice_cluster_serve_config_and_app_args(crd_validators: dict) -> None:
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve.app import app_builder

    obj = _rayservice()
    assert not schema_errors(crd_validators, obj)
    service_accounts = {o["metadata"]["name"] for _, o in all_objects() if o["kind"] == "ServiceAccount"}
    check_ray_cluster_spec(obj["spec"]["rayClusterConfig"], "rayservice-student.yaml", service_accounts)
    # serveConfigV2 as Ray Serve reads it (its own schema), and the app's args as the app builder reads them
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(obj["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    assert app.import_path == "pipelines.serve.app:app_builder" and app.route_prefix == "/"
    app_builder(app.args)  # unknown or invalid keys raise ConfigError
    assert app.args["replicas"]["num_gpus"] >= 1 and app.args["dtype"] == "auto"  # float16 on the GPU


@pytest.mark.parametrize("what, mutate", [
    ("misspelt serve config field", lambda o: o["spec"].update(serveConfig=o["spec"].pop("serveConfigV2"))),
    ("serve config as a mapping", lambda o: o["spec"].update(serveConfigV2=yaml.safe_load(o["spec"]["serveConfigV2"]))),
    ("misspelt cluster field", lambda o: o["spec"]["rayClusterConfig"].update(
        rayVerison=o["spec"]["rayClusterConfig"].pop("rayVersion"))),
])
def test_crd_schema_rejects_wrong_rayservice(crd_validators: dict, what: str, mutate: Any) -> None:
    obj = _rayservice()
    mutate(obj)
    assert schema_errors(crd_validators, obj), f"{what} passed the schema"


def test_student_rayservice_app_args_with_a_typo_fail() -> None:
    from pipelines.serve.app import app_builder

    args = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])["applications"][0]["args"]
    args["batch"]["max_batch_sise"] = args["batch"].pop("max_batch_size")
    with pytest.raises(ConfigError, match="max_batch_sise"):
        app_builder(args)


# ---------------------------------------------------------------- KubeRay placement, clean-up, GPUs


def worker_groups(obj: dict) -> list[dict]:
    if obj["kind"] == "RayCluster":
        return obj["spec"]["workerGroupSpecs"]
    if obj["kind"] == "RayService":
        return obj["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    spec = obj["spec"]["jobTemplate"] if obj["kind"] == "RayCronJob" else obj["spec"]
    return spec["rayClusterSpec"]["workerGroupSpecs"]


def _tolerates_spot(pod: dict) -> bool:
    return any(t.get("key") == "karpenter.sh/capacity-type" and t.get("value") in ("spot", None)
               for t in pod.get("tolerations", []))


def test_training_on_demand_evaluation_on_spot() -> None:
    """Training on spot only in an elastic RayJob (it goes on when a node is reclaimed)."""
    seen = set()
    for where, obj in ray_objects():
        elastic = obj["kind"] == "RayJob" and elastic_workers(obj["spec"]["entrypoint"]) is not None
        for group in worker_groups(obj):
            pod, labels = group["template"]["spec"], group["template"]["metadata"]["labels"]
            market = pod.get("nodeSelector", {}).get("karpenter.sh/capacity-type")
            role = labels["wadi/role"]
            seen.add((where.split(":")[0], role, market))
            assert labels["wadi/market"] == market, f"{where}/{group['groupName']}"
            if role == "train" and elastic:
                assert market == "spot" and _tolerates_spot(pod), f"{where}: elastic training off spot"
                assert pod["nodeSelector"]["karpenter.k8s.aws/instance-gpu-count"] == "8"
            elif role == "train":
                assert market == "on-demand" and not _tolerates_spot(pod), f"{where}: training may land on spot"
                assert pod["nodeSelector"]["karpenter.k8s.aws/instance-gpu-count"] == "8"
            elif role == "serve":  # a reclaimed spot node would drop the requests in flight
                assert market == "on-demand" and not _tolerates_spot(pod), f"{where}: serving may land on spot"
            else:
                assert role == "eval" and market == "spot" and _tolerates_spot(pod), where
                assert pod["nodeSelector"]["karpenter.k8s.aws/instance-gpu-count"] == "4"
    assert {("rayjob-distill.yaml", "train", "on-demand"), ("rayjob-distill-spot.yaml", "train", "spot"),
            ("raycluster.yaml", "train", "on-demand"), ("raycluster.yaml", "eval", "spot"),
            ("raycronjob-evaluate.yaml", "eval", "spot"), ("cronjob-evaluate.yaml", "eval", "spot"),
            ("rayservice-student.yaml", "serve", "on-demand")} <= seen


def _rules(spec: dict) -> dict[tuple, dict[str, int]]:
    """{condition: {policy: ttlSeconds}} of a RayJob spec's deletion rules."""
    out: dict[tuple, dict[str, int]] = {}
    for rule in spec["deletionStrategy"]["deletionRules"]:
        cond = rule["condition"]
        key = ("jobStatus", cond["jobStatus"]) if "jobStatus" in cond else \
            ("jobDeploymentStatus", cond["jobDeploymentStatus"])
        out.setdefault(key, {})[rule["policy"]] = cond.get("ttlSeconds", 0)
    return out


def test_rayjobs_clean_up_after_success_and_failure() -> None:
    order = ["DeleteWorkers", "DeleteCluster", "DeleteSelf"]
    for where, spec in rayjob_specs():
        # KubeRay refuses deletionRules together with shutdownAfterJobFinishes (and so TTL).
        assert "shutdownAfterJobFinishes" not in spec and "ttlSecondsAfterFinished" not in spec, where
        rules = _rules(spec)
        for outcome in (("jobStatus", "SUCCEEDED"), ("jobStatus", "FAILED"), ("jobDeploymentStatus", "Failed")):
            policies = rules.get(outcome, {})
            assert "DeleteCluster" in policies or "DeleteSelf" in policies, f"{where}: {outcome} leaks a cluster"
            ttls = [policies[p] for p in order if p in policies]
            assert ttls == sorted(ttls), f"{where}: {outcome} deletes the larger thing first"
        if "RayCronJob" in where or "cronjob-evaluate" in where:  # scheduled ones remove themselves
            assert all("DeleteSelf" in p for p in rules.values()), where
        else:  # a training run's RayJob stays for its status
            assert not any("DeleteSelf" in p for p in rules.values()), where


def test_cron_schedules_have_a_time_zone() -> None:
    (cron,) = [o for _, o in ray_objects() if o["kind"] == "RayCronJob"]
    (kube_cron,) = [o for _, o in all_objects() if o["kind"] == "CronJob"]
    zoneinfo = pytest.importorskip("zoneinfo")
    for obj in (cron, kube_cron):
        zoneinfo.ZoneInfo(obj["spec"]["timeZone"])  # a real IANA name
        assert "TZ=" not in obj["spec"]["schedule"], "time zone in the schedule string and timeZone"


def _pack_onto_gpus(demands: list[float], gpus_per_pod: list[int]) -> bool:
    """First-fit decreasing, as Ray places GPU actors: a whole-GPU actor takes free GPUs of one
    pod, a fractional one must fit on a single GPU's remainder."""
    free = [[1.0] * n for n in gpus_per_pod]  # per pod, per GPU
    for d in sorted(demands, reverse=True):
        placed = False
        for pod in free:
            if d >= 1:
                whole = [i for i, f in enumerate(pod) if f >= 1.0 - 1e-9]
                if len(whole) >= d:
                    for i in whole[: int(d)]:
                        pod[i] = 0.0
                    placed = True
            else:
                for i, f in enumerate(pod):
                    if f >= d - 1e-9:
                        pod[i] = f - d
                        placed = True
                        break
            if placed:
                break
        if not placed:
            return False
    return True


def test_gpu_packing_check_refuses_what_does_not_fit() -> None:
    assert _pack_onto_gpus([1, 1, 1, 0.5, 0.5], [4])
    assert not _pack_onto_gpus([1, 1, 1, 1, 1], [4])           # the old 5 GPUs on a 4-GPU pod
    assert not _pack_onto_gpus([1, 1, 1, 0.6, 0.6], [4])       # 0.6 + 0.6 do not share one GPU
    assert not _pack_onto_gpus([2, 2, 1], [4])


def test_evaluation_actors_fit_the_evaluation_pods() -> None:
    """Generation and feature actors stream at once: their GPUs must pack onto the pods' GPUs.
    The entrypoint is parsed by jobs/evaluate.py's own parser (keys, defaults, validation)."""
    import importlib

    evaluate = importlib.import_module("jobs.evaluate")
    checked = 0
    for where, spec in rayjob_specs():
        if "jobs/evaluate.py" not in spec["entrypoint"]:
            continue
        argv = spec["entrypoint"].split("jobs/evaluate.py", 1)[1].split()
        r = evaluate.parse_args(argv)[1].ray
        demands = [r.gpus_per_actor] * r.gen_workers + [r.metric_gpus] * r.metric_workers
        groups = spec["rayClusterSpec"]["workerGroupSpecs"]
        pods = [int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
                for g in groups for _ in range(g["maxReplicas"])]
        assert _pack_onto_gpus(demands, pods), f"{where}: actors {demands} do not fit pods with {pods} GPUs"
        checked += 1
    assert checked >= 2


def test_distill_world_size_fits_the_training_pods() -> None:
    from pipelines.config.job import load_config

    (job,) = [o for w, o in ray_objects() if w == "rayjob-distill.yaml:RayJob"]
    recipe = re.search(r"--config (\S+)", job["spec"]["entrypoint"]).group(1)
    train = load_config(str(ROOT / recipe)).train
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert train.num_workers * train.gpus_per_worker <= gpus * group["maxReplicas"]


# ---------------------------------------------------------------- elastic training on spot capacity


def override_keys(command: str) -> list[str]:
    """The dotted ``key=value`` overrides of a job command."""
    return [a.split("=", 1)[0] for a in command.split() if re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+=\S*", a)]


def distill_key_exists(key: str) -> bool:
    """Whether ``key`` (e.g. ``train.min_workers``) names a field of jobs/distill.py's config."""
    from pipelines.config.job import DistillConfig

    node: Any = DistillConfig()
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return True


def elastic_workers(command: str) -> tuple[int, int] | None:
    """(train.min_workers, train.num_workers) of an elastic distill command; None for a fixed-size one."""
    values = dict(re.findall(r"\btrain\.(min_workers|num_workers)=(\d+)", command))
    if "min_workers" not in values:
        return None
    assert "num_workers" in values, f"{command!r}: train.min_workers without train.num_workers"
    return int(values["min_workers"]), int(values["num_workers"])


def recipe_train(command: str) -> Any:
    """The TrainConfig of the recipe a distill command names, before its overrides."""
    from pipelines.config.job import load_config

    recipe = re.search(r"--config (\S+)", command).group(1)
    return load_config(str(ROOT / recipe)).train


def check_elastic_fit(command: str, gpus_per_node: int, cpus_per_node: float, max_nodes: int,
                      min_nodes: int | None, where: str) -> None:
    """An elastic distill command against the nodes it runs on: whole nodes come and go, so
    min_workers and num_workers are whole nodes of workers, and the global batch splits evenly at
    every world size the nodes can give. min_nodes None: the launcher (its min_workers is 0, the job
    sets the floor)."""
    m, n = elastic_workers(command) or (0, 0)
    assert 0 < m < n, f"{where}: train.min_workers={m} must be above 0 and below train.num_workers={n}"
    train = recipe_train(command)
    assert train.gpus_per_worker >= 1, f"{where}: elastic spot training needs GPU workers"
    per_node = int(gpus_per_node // train.gpus_per_worker)
    assert per_node * train.cpus_per_worker <= cpus_per_node, f"{where}: {per_node} workers' CPUs do not fit a node"
    assert n == max_nodes * per_node, \
        f"{where}: train.num_workers={n} is not {max_nodes} nodes x {per_node} workers (the most nodes)"
    assert m % per_node == 0, f"{where}: train.min_workers={m} is not whole nodes of {per_node} workers"
    if min_nodes is not None:
        assert m == min_nodes * per_node, \
            f"{where}: train.min_workers={m} is not {min_nodes} nodes x {per_node} workers (the fewest nodes)"
    uneven = [w for w in range(m, n + 1, per_node) if train.global_batch % w]
    assert not uneven, f"{where}: train.global_batch={train.global_batch} does not split over world size(s) {uneven}"


def elastic_rayjobs() -> list[tuple[str, dict]]:
    return [(where, o) for where, o in ray_objects()
            if o["kind"] == "RayJob" and elastic_workers(o["spec"]["entrypoint"]) is not None]


def check_elastic_rayjob(obj: dict, where: str) -> None:
    """An elastic RayJob: head on on-demand nodes, one autoscaled spot training group that fits
    train.min_workers..train.num_workers in whole pods and starts at full size."""
    spec = obj["spec"]
    cluster = spec["rayClusterSpec"]
    assert cluster.get("enableInTreeAutoscaling") is True, f"{where}: no autoscaler brings a reclaimed pod back"
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head.get("nodeSelector", {}).get("karpenter.sh/capacity-type") == "on-demand" \
        and not _tolerates_spot(head), f"{where}: the head (GCS, Train controller) may land on spot"
    (group,) = [g for g in cluster["workerGroupSpecs"] if g["template"]["metadata"]["labels"]["wadi/role"] == "train"]
    pod = group["template"]["spec"]
    assert pod["nodeSelector"]["karpenter.sh/capacity-type"] == "spot" and _tolerates_spot(pod), \
        f"{where}: the training group is not on spot nodes"
    assert group["minReplicas"] <= group["replicas"] == group["maxReplicas"], \
        f"{where}: the training group must start at maxReplicas (full size) and keep minReplicas below it"
    (container,) = pod["containers"]
    limits = container["resources"]["limits"]
    check_elastic_fit(spec["entrypoint"], int(limits["nvidia.com/gpu"]), float(limits["cpu"]),
                      group["maxReplicas"], group["minReplicas"], where)


def test_spot_rayjob_is_elastic_and_fits_its_pods(crd_validators: dict) -> None:
    jobs = elastic_rayjobs()
    assert [w for w, _ in jobs] == ["rayjob-distill-spot.yaml:RayJob"]
    for where, obj in jobs:
        assert not schema_errors(crd_validators, obj)
        check_elastic_rayjob(obj, where)
        assert "train.run_name=" in obj["spec"]["entrypoint"], f"{where}: shares the on-demand run's checkpoints"


def _spot_job() -> dict:
    (job,) = [copy.deepcopy(o) for _, o in elastic_rayjobs()]
    return job


def _train_group(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def _entrypoint_sub(pattern: str, repl: str):
    def f(obj: dict) -> None:
        new = re.sub(pattern, repl, obj["spec"]["entrypoint"])
        assert new != obj["spec"]["entrypoint"], pattern
        obj["spec"]["entrypoint"] = new
    return f


_ELASTIC_MUTATIONS = [
    ("min_workers over num_workers", _entrypoint_sub(r"train\.min_workers=\d+", "train.min_workers=24"),
     "must be above 0 and below train.num_workers"),
    ("num_workers beyond the pods", _entrypoint_sub(r"train\.num_workers=\d+", "train.num_workers=24"),
     r"train.num_workers=24 is not 2 nodes x 8 workers"),
    ("min_workers not whole pods", _entrypoint_sub(r"train\.min_workers=\d+", "train.min_workers=4"),
     "not whole nodes of 8 workers"),
    ("minReplicas over maxReplicas", lambda o: _train_group(o).update(minReplicas=3),
     "minReplicas below it"),
    ("maxReplicas over num_workers", lambda o: _train_group(o).update(maxReplicas=3, replicas=3),
     r"train.num_workers=16 is not 3 nodes x 8 workers"),
    ("minReplicas under min_workers", lambda o: _train_group(o).update(minReplicas=0),
     r"train.min_workers=8 is not 0 nodes x 8 workers"),
    ("head on spot", lambda o: o["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
     .update(nodeSelector={"karpenter.sh/capacity-type": "spot"}), "the head .* may land on spot"),
    ("training without the spot toleration", lambda o: _train_group(o)["template"]["spec"]["tolerations"].pop(),
     "not on spot nodes"),
    ("no autoscaler", lambda o: o["spec"]["rayClusterSpec"].pop("enableInTreeAutoscaling"),
     "no autoscaler"),
]


@pytest.mark.parametrize("what, mutate, error", _ELASTIC_MUTATIONS, ids=[m[0] for m in _ELASTIC_MUTATIONS])
def test_wrong_spot_rayjob_fails_the_elastic_check(what: str, mutate: Any, error: str) -> None:
    job = _spot_job()
    check_elastic_rayjob(job, "spot")
    mutate(job)
    with pytest.raises(AssertionError, match=error):
        check_elastic_rayjob(job, "spot")


def test_spot_rayjob_config_loads() -> None:
    from pipelines.config.job import load_config

    (job,) = [o for _, o in elastic_rayjobs()]
    command = job["spec"]["entrypoint"]
    overrides = [a for a in command.split() if "=" in a and not a.startswith("-")]
    train = load_config(str(ROOT / re.search(r"--config (\S+)", command).group(1)), overrides).train
    assert train.elastic and (train.min_workers, train.num_workers) == elastic_workers(command)


@pytest.fixture(scope="module")
def spot_cluster_cfg() -> dict:
    return yaml.safe_load(CLUSTER_SPOT_YAML.read_text())


def test_spot_cluster_is_the_on_demand_one_with_spot_training_nodes(cluster_cfg: dict, spot_cluster_cfg: dict) -> None:
    """Same head, image, credentials and commands as ray_cluster.yaml (one place to change them is
    not possible in YAML, so this keeps the copy honest); training types spot, the head not."""
    differ = {k for k in cluster_cfg.keys() | spot_cluster_cfg.keys() if cluster_cfg.get(k) != spot_cluster_cfg.get(k)}
    assert differ == {"cluster_name", "max_workers", "available_node_types"}, differ
    # `ray up` finds a cluster by its name: the same name would update (or `ray down`) the other one.
    assert spot_cluster_cfg["cluster_name"] != cluster_cfg["cluster_name"]
    head = spot_cluster_cfg["head_node_type"]
    assert spot_cluster_cfg["available_node_types"][head] == cluster_cfg["available_node_types"][head]
    assert not is_spot(spot_cluster_cfg["available_node_types"][head])
    training = training_types(spot_cluster_cfg)
    workers = {n for n in spot_cluster_cfg["available_node_types"] if n != head}
    assert training and set(training) == workers, "the spot cluster is for training only"
    assert all(is_spot(s) for s in training.values())
    assert sum(s["max_workers"] for s in training.values()) == spot_cluster_cfg["max_workers"]


def test_spot_cluster_command_is_elastic_and_fits_its_nodes(spot_cluster_cfg: dict) -> None:
    (command,) = launcher_commands(CLUSTER_SPOT_YAML)
    (spec,) = training_types(spot_cluster_cfg).values()
    check_elastic_fit(command, spec["resources"]["GPU"], spec["resources"]["CPU"], spec["max_workers"], None,
                      CLUSTER_SPOT_YAML.name)
    accelerator = re.search(r"train\.accelerator_type=(\S+)", command).group(1)
    assert f"accelerator_type:{accelerator}" in spec["resources"]


def test_elastic_fit_check_refuses_a_launcher_too_small_for_the_command(spot_cluster_cfg: dict) -> None:
    (command,) = launcher_commands(CLUSTER_SPOT_YAML)
    (spec,) = training_types(spot_cluster_cfg).values()
    with pytest.raises(AssertionError, match=r"train.num_workers=16 is not 1 nodes x 8 workers"):
        check_elastic_fit(command, spec["resources"]["GPU"], spec["resources"]["CPU"], 1, None, "one node")
    with pytest.raises(AssertionError, match="workers' CPUs do not fit a node"):
        check_elastic_fit(command, spec["resources"]["GPU"], 16, spec["max_workers"], None, "few CPUs")


def test_override_key_check_knows_the_distill_config() -> None:
    keys = override_keys("python jobs/distill.py --config recipes/sd15.yaml train.min_workers=8 vsd.student.rank=4")
    assert keys == ["train.min_workers", "vsd.student.rank"] and all(map(distill_key_exists, keys))
    for wrong in ("train.min_worker", "train.min_workers.x", "trian.num_workers"):
        assert not distill_key_exists(wrong), wrong


def test_both_scheduled_evaluations_run_the_same_job() -> None:
    (cron,) = [o for _, o in all_objects() if o["kind"] == "RayCronJob"]
    (job,) = [o for p, o in all_objects() if o["kind"] == "RayJob" and p.name == "cronjob-evaluate.yaml"]
    assert job["spec"] == cron["spec"]["jobTemplate"]
    assert "jobs/evaluate.py schedule" in job["spec"]["entrypoint"]
    (kube_cron,) = [o for _, o in all_objects() if o["kind"] == "CronJob"]
    for schedule in (cron["spec"]["schedule"], kube_cron["spec"]["schedule"]):
        assert re.fullmatch(r"(\S+ ){4}\S+", schedule), schedule


def test_plain_cronjob_has_the_rights_to_create_rayjobs_and_nothing_more() -> None:
    docs = load_docs(KUBERAY / "cronjob-evaluate.yaml")
    by_kind = {d["kind"]: d for d in docs}
    pod = by_kind["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    sa = pod["serviceAccountName"]
    assert by_kind["ServiceAccount"]["metadata"]["name"] == sa
    binding = by_kind["RoleBinding"]
    assert {"kind": "ServiceAccount", "name": sa} in binding["subjects"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": by_kind["Role"]["metadata"]["name"]}
    (rule,) = by_kind["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert "create" in rule["verbs"] and not {"*", "delete", "update", "patch"} & set(rule["verbs"])
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == by_kind["ConfigMap"]["metadata"]["name"]
    created = container["command"][container["command"].index("-f") + 1]
    assert Path(created).parent == Path(mount["mountPath"])
    assert Path(created).name in by_kind["ConfigMap"]["data"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def launcher_commands(path: Path) -> list[str]:
    """The job commands in a cluster launcher config's header comment (its usage lines)."""
    comments = "\n".join(line.lstrip("#").strip() for line in path.read_text().splitlines()
                         if line.startswith("#"))
    return ["python " + m.group(1).strip()
            for m in re.finditer(r"python (jobs/\S+\.py[^\n]*)", comments.replace("\\\n", " "))]


def entrypoint_commands() -> list[tuple[str, str]]:
    """(where, command) for every job command in the manifests, the launcher configs and the cluster doc."""
    found = [(where, spec["entrypoint"]) for where, spec in rayjob_specs()]
    found += [(path.name, command) for path in CLUSTER_FILES for command in launcher_commands(path)]
    for line in CLUSTER_DOC.read_text().replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0]  # a shell comment after the command is prose
        for m in re.finditer(r"python (jobs/\S+\.py[^`|]*)", line):
            found.append(("docs/CLUSTER.md", "python " + m.group(1).strip()))
    return found


def test_entrypoints_name_jobs_recipes_and_flags_that_exist() -> None:
    commands = entrypoint_commands()
    assert any("jobs/distill.py --config recipes/sd15.yaml" in c for _, c in commands)
    missing = []
    for where, command in commands:
        job = re.search(r"(jobs/\S+\.py)", command).group(1)
        if not (ROOT / job).is_file():
            missing.append(f"{where}: {job}")
            continue
        source = (ROOT / job).read_text()
        args = command.split(job, 1)[1].split()
        if args and not args[0].startswith("-") and "=" not in args[0] and f'"{args[0]}"' not in source:
            missing.append(f"{where}: {job} has no subcommand {args[0]}")
        shared = {"--config", "--print-config"} if "add_config_arguments(" in source else set()  # pipelines/config/cli.py
        for flag in (a for a in args if a.startswith("--")):
            if f'"{flag.split("=")[0]}"' not in source and flag.split("=")[0] not in shared:
                missing.append(f"{where}: {job} has no option {flag}")
        if job == "jobs/distill.py":
            missing += [f"{where}: {job} has no config key {key}" for key in override_keys(command)
                        if not distill_key_exists(key)]
    doc_recipes = re.findall(r"recipes/[\w.-]+\.yaml", CLUSTER_DOC.read_text())
    for recipe in set(doc_recipes + re.findall(r"recipes/[\w.-]+\.yaml", str(commands))):
        if not (ROOT / recipe).is_file():
            missing.append(f"recipe {recipe}")
    assert not missing, "manifests/docs name things that do not exist: " + "; ".join(missing)


# ---------------------------------------------------------------- MLflow server


def test_mlflow_compose_takes_every_credential_from_the_environment() -> None:
    compose = yaml.safe_load((MLFLOW / "docker-compose.yaml").read_text())
    assert {"db", "mlflow"} <= set(compose["services"])
    assert compose["services"]["mlflow"]["image"].endswith(":" + pinned("mlflow"))
    assert re.search(rf"^ARG MLFLOW_VERSION={re.escape(pinned('mlflow'))}$",
                     (MLFLOW / "Dockerfile").read_text(), re.M)
    for name, service in compose["services"].items():
        for key, value in service.get("environment", {}).items():
            if re.search(r"PASSWORD|SECRET|KEY_ID|TOKEN", key):
                assert re.fullmatch(r"\$\{\w+(:[-?][^}]*)?\}", str(value)), f"{name}.{key}"
    assert ".env" in (MLFLOW / ".gitignore").read_text().split()


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_mlflow_entrypoint_starts_basic_auth_server_from_env(tmp_path: Path) -> None:
    stub_bin = tmp_path / "bin"
    stub_bin.mkdir()
    record = tmp_path / "record.json"
    stub = stub_bin / "mlflow"  # records what `exec mlflow server ...` received
    stub.write_text(
        f"#!{sys.executable}\nimport json, os, stat, sys\n"
        "ini = os.environ['MLFLOW_AUTH_CONFIG_PATH']\n"
        f"json.dump({{'argv': sys.argv[1:], 'uri': os.environ['MLFLOW_BACKEND_STORE_URI'],"
        " 'ini': open(ini).read(), 'mode': stat.S_IMODE(os.stat(ini).st_mode)},"
        f" open({str(record)!r}, 'w'))\n")
    stub.chmod(0o755)
    script = str(MLFLOW / "entrypoint.sh")
    path = os.pathsep.join([str(stub_bin), str(Path(sys.executable).parent), "/usr/bin", "/bin"])

    empty = subprocess.run(["sh", script], env={"PATH": path}, capture_output=True, text=True)
    assert empty.returncode == 2 and "POSTGRES_PASSWORD" in empty.stderr

    env = {"PATH": path, "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           "POSTGRES_HOST": "db", "POSTGRES_DB": "mlflow", "POSTGRES_USER": "u",
           "POSTGRES_PASSWORD": "p@ss/w:rd", "MLFLOW_ARTIFACTS_DESTINATION": "s3://b/mlflow",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "k"}
    subprocess.run(["sh", script], env=env, check=True, timeout=60)
    got = json.loads(record.read_text())
    assert got["argv"][:3] == ["server", "--app-name", "basic-auth"]
    assert "--serve-artifacts" in got["argv"]
    assert got["argv"][got["argv"].index("--artifacts-destination") + 1] == "s3://b/mlflow"
    assert got["uri"] == "postgresql://u:p%40ss%2Fw%3Ard@db:5432/mlflow"
    assert "database_uri = postgresql://u:p%40ss%2Fw%3Ard@db:5432/mlflow" in got["ini"]
    assert got["mode"] & (stat.S_IRWXG | stat.S_IRWXO) == 0, "auth config readable by others"


# ---------------------------------------------------------------- no secrets anywhere

SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),                                   # AWS key id
    re.compile(r"(?i)aws_secret_access_key\W{1,4}[A-Za-z0-9/+=]{40}"),           # AWS secret
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
ASSIGNMENT = re.compile(r"(?i)(password|passwd|secret_key|api_key|token)\"?\s*[:=]\s*(\S*)")
REFERENCE = re.compile(r"""^(\$\{\}|["']?\$.*|\.\.\.|<[^>]*>|os\.environ.*)?$""")
INLINE_URL_CREDENTIALS = re.compile(r"://([^/\s:@]+):([^/\s@]+)@")


def find_secrets(text: str) -> list[str]:
    """Lines that look like they hold a credential (not a reference to one)."""
    hits = []
    for n, line in enumerate(text.splitlines(), 1):
        plain = re.sub(r"\$\{[^}]*\}", "${}", line)
        if any(p.search(line) for p in SECRET_PATTERNS):
            hits.append(f"{n}: key pattern")
        for m in ASSIGNMENT.finditer(plain):
            if not REFERENCE.match(m.group(2)):
                hits.append(f"{n}: literal {m.group(1)}")
        for m in INLINE_URL_CREDENTIALS.finditer(plain):
            if m.group(2) != "${}":
                hits.append(f"{n}: credentials in a URL")
    return hits


def scanned_files() -> list[Path]:
    files = [*CLUSTER_FILES, CLUSTER_DOC] + [p for p in (ROOT / "infra").rglob("*") if p.is_file()]
    # A local .env is git-ignored by design; the vendored CRD schema and its generator name fields
    # such as redisPassword / serviceAccountToken (no values): checked for key patterns only, below.
    return [p for p in files if p.name != ".env" and p.parent != CRD_SCHEMA.parent]


def test_secret_scanner_catches_planted_secrets() -> None:
    fake_key = "AKIA" + "ABCDEFGHIJKLMNOP"
    for text in (f"key: {fake_key}", "password: hunter2", "MLFLOW_TRACKING_PASSWORD=hunter2",
                 "uri: postgresql://user:hunter2@db/mlflow"):
        assert find_secrets(text), text
    for text in ("password: ${PW:?set it}", 'MLFLOW_TRACKING_PASSWORD="$MLFLOW_TRACKING_PASSWORD"',
                 "POSTGRES_PASSWORD=", "postgresql://${POSTGRES_USER}:${pw}@db"):
        assert not find_secrets(text), text


def test_no_secrets_in_infrastructure_files() -> None:
    files = scanned_files()
    assert len(files) >= 12
    hits = {str(p.relative_to(ROOT)): h for p in files if (h := find_secrets(p.read_text()))}
    assert not hits, f"possible credentials: {hits}"
    for _, obj in all_objects():
        assert obj["kind"] != "Secret", "create secrets with kubectl, never from a manifest"
    for path in CRD_SCHEMA.parent.iterdir():
        assert not any(p.search(path.read_text()) for p in SECRET_PATTERNS), path


def test_entrypoint_is_executable() -> None:
    assert (MLFLOW / "entrypoint.sh").stat().st_mode & stat.S_IXUSR
