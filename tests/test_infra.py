"""infra/: the KubeRay manifests validate strictly, the Dockerfile installs what the README
installs, and the cluster-launcher YAML passes Ray's own schema.

The KubeRay CRDs are not copied into this repository. :data:`RAY_JOB` and :data:`RAY_CLUSTER`
below are a small strict schema of exactly the fields the manifests use, with the names, types,
required fields and enums of the ``ray.io/v1`` CRDs (``ray-operator/config/crd/bases/
ray.io_rayjobs.yaml`` and ``ray.io_rayclusters.yaml`` in ray-project/kuberay); the pod templates
are checked against a like whitelist of core/v1 fields. Any field outside the schema is an error,
as it is for the API server with strict field validation. When a KubeRay checkout is at hand,
``KUBERAY_CRD_DIR=<kuberay>/ray-operator/config/crd/bases`` also checks that every field of the
schema exists in the CRD with the same type (:func:`test_schema_agrees_with_the_kuberay_crds`).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"

# -- a small strict schema language -----------------------------------------------------------
S, INT, B, N = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "number"}
#: A Kubernetes quantity or port: an integer or a string (x-kubernetes-int-or-string).
Q = {"type": "int-or-string"}


def obj(*required: str, **properties: dict) -> dict:
    return {"type": "object", "required": list(required), "properties": properties}


def arr(items: dict) -> dict:
    return {"type": "array", "items": items}


def mapof(values: dict) -> dict:
    return {"type": "object", "additionalProperties": values}


def enum(*values: str) -> dict:
    return {"type": "string", "enum": list(values)}


_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "int-or-string": lambda v: isinstance(v, str | int) and not isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def validate(value: Any, schema: dict, path: str = "") -> list[str]:
    """Every violation of ``schema`` in ``value``; unknown fields are violations."""
    if not _TYPES[schema["type"]](value):
        return [f"{path or '.'}: expected {schema['type']}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} is not one of {schema['enum']}"]
    errors: list[str] = []
    if schema["type"] == "array":
        for i, item in enumerate(value):
            errors += validate(item, schema["items"], f"{path}[{i}]")
    elif "additionalProperties" in schema:
        for key, item in value.items():
            errors += validate(item, schema["additionalProperties"], f"{path}.{key}")
    elif schema["type"] == "object":
        errors += [f"{path}.{k}: required" for k in schema["required"] if k not in value]
        for key, item in value.items():
            if key not in schema["properties"]:
                errors.append(f"{path}.{key}: unknown field")
            else:
                errors += validate(item, schema["properties"][key], f"{path}.{key}")
    return errors


# -- core/v1 and apps/v1: the fields the manifests use ----------------------------------------
METADATA = obj("name", name=S, namespace=S, labels=mapof(S), annotations=mapof(S))
ENV_VAR = obj(
    "name",
    name=S,
    value=S,
    valueFrom=obj(secretKeyRef=obj("key", name=S, key=S, optional=B)),
)
CONTAINER = obj(
    "name",
    name=S,
    image=S,
    command=arr(S),
    args=arr(S),
    env=arr(ENV_VAR),
    ports=arr(obj("containerPort", containerPort=INT, name=S, protocol=enum("TCP", "UDP", "SCTP"))),
    resources=obj(requests=mapof(Q), limits=mapof(Q)),
    volumeMounts=arr(obj("mountPath", "name", name=S, mountPath=S, readOnly=B, subPath=S)),
    lifecycle=obj(preStop=obj(exec=obj(command=arr(S)))),
    readinessProbe=obj(
        httpGet=obj("port", path=S, port=Q), periodSeconds=INT, initialDelaySeconds=INT
    ),
)
VOLUME = obj(
    "name",
    name=S,
    persistentVolumeClaim=obj("claimName", claimName=S, readOnly=B),
    emptyDir=obj(medium=S, sizeLimit=Q),
)
POD_TEMPLATE = obj(
    metadata=obj(labels=mapof(S), annotations=mapof(S)),
    spec=obj(
        "containers",
        containers=arr(CONTAINER),
        volumes=arr(VOLUME),
        tolerations=arr(
            obj(
                key=S,
                operator=enum("Exists", "Equal"),
                value=S,
                effect=enum("NoSchedule", "PreferNoSchedule", "NoExecute"),
            )
        ),
        securityContext=obj(runAsNonRoot=B, runAsUser=INT, runAsGroup=INT, fsGroup=INT),
        nodeSelector=mapof(S),
        serviceAccountName=S,
        terminationGracePeriodSeconds=INT,
    ),
)


def resource(api_version: str, kind: str, spec: dict) -> dict:
    return obj(
        "apiVersion",
        "kind",
        "metadata",
        "spec",
        apiVersion=enum(api_version),
        kind=enum(kind),
        metadata=METADATA,
        spec=spec,
    )


# -- ray.io/v1 (from the KubeRay CRDs) --------------------------------------------------------
HEAD_GROUP = obj("template", rayStartParams=mapof(S), serviceType=S, template=POD_TEMPLATE)
WORKER_GROUP = obj(
    "groupName",
    "maxReplicas",
    "minReplicas",
    "template",
    groupName=S,
    replicas=INT,
    minReplicas=INT,
    maxReplicas=INT,
    idleTimeoutSeconds=INT,
    rayStartParams=mapof(S),
    template=POD_TEMPLATE,
)
RAY_CLUSTER_SPEC = obj(
    "headGroupSpec",
    rayVersion=S,
    enableInTreeAutoscaling=B,
    authOptions=obj(mode=enum("disabled", "token"), secretName=S),
    autoscalerOptions=obj(
        upscalingMode=enum("Default", "Aggressive", "Conservative"), idleTimeoutSeconds=INT
    ),
    headGroupSpec=HEAD_GROUP,
    workerGroupSpecs=arr(WORKER_GROUP),
)
RAY_JOB_SPEC = obj(
    entrypoint=S,
    entrypointNumCpus=N,
    runtimeEnvYAML=S,
    backoffLimit=INT,
    # The CRD types it as a string; the operator accepts these (rayv1.JobSubmissionMode).
    submissionMode=enum("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"),
    submitterConfig=obj(backoffLimit=INT),
    shutdownAfterJobFinishes=B,
    ttlSecondsAfterFinished=INT,
    activeDeadlineSeconds=INT,
    rayClusterSpec=RAY_CLUSTER_SPEC,
)
RAY_JOB = resource("ray.io/v1", "RayJob", RAY_JOB_SPEC)
RAY_CLUSTER = resource("ray.io/v1", "RayCluster", RAY_CLUSTER_SPEC)
DEPLOYMENT = resource(
    "apps/v1",
    "Deployment",
    obj(
        "selector",
        "template",
        replicas=INT,
        strategy=obj(type=enum("Recreate", "RollingUpdate")),
        selector=obj(matchLabels=mapof(S)),
        template=POD_TEMPLATE,
    ),
)
SERVICE = resource(
    "v1",
    "Service",
    obj(
        selector=mapof(S),
        type=enum("ClusterIP", "NodePort", "LoadBalancer"),
        ports=arr(obj("port", name=S, port=INT, targetPort=Q, protocol=enum("TCP", "UDP"))),
    ),
)
PVC = resource(
    "v1",
    "PersistentVolumeClaim",
    obj(
        accessModes=arr(enum("ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany")),
        storageClassName=S,
        resources=obj(requests=mapof(Q)),
    ),
)
SCHEMAS = {
    ("ray.io/v1", "RayJob"): RAY_JOB,
    ("ray.io/v1", "RayCluster"): RAY_CLUSTER,
    ("apps/v1", "Deployment"): DEPLOYMENT,
    ("v1", "Service"): SERVICE,
    ("v1", "PersistentVolumeClaim"): PVC,
}


def _manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def _errors(doc: dict) -> list[str]:
    schema = SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if schema is None:
        return [f"no schema for {doc.get('apiVersion')} {doc.get('kind')}"]
    return validate(doc, schema)


def _one(kind: str) -> dict:
    (doc,) = [d for _, d in _manifests() if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("name,doc", _manifests(), ids=lambda v: v if isinstance(v, str) else "")
def test_manifests_validate_strictly(name, doc) -> None:
    assert _errors(doc) == [], f"{name}: {doc['kind']}"


def test_every_manifest_kind_is_there() -> None:
    kinds = sorted(d["kind"] for _, d in _manifests())
    assert kinds == ["Deployment", "PersistentVolumeClaim", "RayCluster", "RayJob", "Service"]


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda d: d["spec"].update(shutdownAfterJobFinish=True), ".spec.shutdownAfterJobFinish"),
        (
            lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("maxReplicas"),
            "workerGroupSpecs[0].maxReplicas: required",
        ),
        (
            lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["rayStartParams"].update(
                {"num-gpus": 1}
            ),
            "rayStartParams.num-gpus: expected string",
        ),
        (lambda d: d["spec"].update(submissionMode="K8sMode"), "is not one of"),
        (
            lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
                "containers"
            ][0].update(imagePullPolicyy="Always"),
            "containers[0].imagePullPolicyy: unknown field",
        ),
    ],
    ids=["typo", "missing-required", "int-start-param", "bad-enum", "pod-typo"],
)
def test_a_wrong_field_fails(edit, expected) -> None:
    doc = copy.deepcopy(_one("RayJob"))
    edit(doc)
    errors = _errors(doc)
    assert any(expected in e for e in errors), errors


def test_rayjob_runs_the_training_cli_on_gpu_workers_with_shared_storage() -> None:
    spec = _one("RayJob")["spec"]
    (script,) = shlex.split(spec["entrypoint"])[2:]  # bash -c '<script>'
    command = shlex.split(script.split("exec ", 1)[1])
    assert command[:3] == ["python", "-m", "distnoisy.train"]
    args = dict(a.split("=", 1) for a in command[3:] if "=" in a)
    assert Path(command[4]).name == "clothing1m_elr.yaml"
    assert (ROOT / "distnoisy/configs/clothing1m_elr.yaml").exists()
    assert args["data.urls"].startswith("s3://")
    assert args["output_dir"].startswith("/shared/")
    assert args["tracking.uri"].startswith("http://distnoisy-mlflow.")
    assert args["scaling.use_gpu"] == "true" and int(args["scaling.max_failures"]) >= 1
    # resume=true is added exactly when the run directory already holds a run
    assert f"test -f {args['output_dir']}/run.json && R=resume=true" in script
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert int(args["scaling.num_workers"]) == sum(w["replicas"] for w in workers)
    for group in workers:
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert "/shared" in [m["mountPath"] for m in container["volumeMounts"]]
    assert spec["shutdownAfterJobFinishes"] is True


def test_raycluster_autoscales_gpu_workers() -> None:
    spec = _one("RayCluster")["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert sorted(groups) == ["gpu", "gpu-spot"]
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] > group["minReplicas"]
    # The spot group: spot nodes only, and time for Ray to drain a reclaimed node (the run's
    # preemption notice); otherwise the same pods as the on-demand group.
    spot, on_demand = groups["gpu-spot"]["template"]["spec"], groups["gpu"]["template"]["spec"]
    assert spot["nodeSelector"] == {"eks.amazonaws.com/capacityType": "SPOT"}
    assert spot["terminationGracePeriodSeconds"] >= 60
    assert spot["containers"] == on_demand["containers"]


def test_the_elastic_command_of_the_docs_validates() -> None:
    # docs/cluster.md's spot run: the worker range and the global batch it divides.
    from distnoisy.config import load_config

    docs = (ROOT / "docs" / "cluster.md").read_text()
    block = docs.split("<!-- elastic-command -->", 1)[1].split("```bash", 1)[1].split("```")[0]
    command = shlex.split(block.replace("\\\n", " "))
    args = [a for a in command[command.index("distnoisy.train") + 1 :] if "=" in a]
    args = [a for a in args if not a.startswith(("data.urls=", "output_dir=", "tracking.uri="))]
    config = ROOT / "distnoisy" / "configs" / "clothing1m_elr.yaml"
    cfg = load_config(["--config", str(config), *args])
    assert cfg.scaling.min_workers is not None and cfg.scaling.min_workers < cfg.scaling.num_workers
    assert cfg.train.checkpoint_every_steps > 0 and cfg.data.split == "sample"


def test_images_and_ray_version_agree_with_the_project() -> None:
    pin = _ray_pin()
    images = {
        c["image"]
        for _, doc in _manifests()
        for c in _containers(doc)
    }  # fmt: skip
    launcher = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    assert images == {launcher["docker"]["image"]}
    for kind in ("RayJob", "RayCluster"):
        spec = _one(kind)["spec"]
        assert spec.get("rayClusterSpec", spec)["rayVersion"] == pin


def test_mlflow_server_serves_artifacts_from_a_database_backend() -> None:
    (container,) = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    args = dict(
        a.lstrip("-").split("=", 1) if "=" in a else (a.lstrip("-"), "") for a in container["args"]
    )
    assert container["command"] == ["mlflow", "server"]
    assert args["backend-store-uri"].startswith(("sqlite:///", "postgresql://", "mysql://"))
    assert "serve-artifacts" in args and args["artifacts-destination"]
    service = _one("Service")
    assert service["metadata"]["name"] == "distnoisy-mlflow"
    assert service["spec"]["ports"][0]["port"] == int(args["port"])
    uri = _one("RayJob")["spec"]["entrypoint"].split("tracking.uri=")[1].split()[0]
    assert uri.startswith(f"http://{service['metadata']['name']}.") and uri.endswith(":5000")


def _containers(doc: dict) -> list[dict]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    if doc["kind"] in ("RayJob", "RayCluster"):
        groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
        return [c for g in groups for c in g["template"]["spec"]["containers"]]
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]["spec"]["containers"]
    return []


def _pyproject(pattern: str) -> str:
    """The first group of ``pattern`` in pyproject.toml (tomllib needs Python 3.11)."""
    match = re.search(pattern, (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert match, pattern
    return match.group(1)


def _ray_pin() -> str:
    return _pyproject(r'"ray\[[a-z,]+\]==([0-9.]+)"')


# -- the schema against the CRDs themselves (when a KubeRay checkout is at hand) ---------------
def _crd_schema(directory: Path, plural: str) -> dict:
    crd = yaml.safe_load((directory / f"ray.io_{plural}.yaml").read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def _subschema_errors(ours: dict, theirs: dict, path: str) -> list[str]:
    """Fields of ``ours`` missing from the CRD's ``theirs`` or typed differently there."""
    kind = ours["type"]
    their_kind = "int-or-string" if theirs.get("x-kubernetes-int-or-string") else theirs.get("type")
    if kind != their_kind and not (kind == "string" and "enum" in ours and their_kind == "string"):
        return [f"{path}: ours {kind}, CRD {their_kind}"]
    if "enum" in ours and "enum" in theirs and not set(ours["enum"]) <= set(theirs["enum"]):
        return [f"{path}: enum {ours['enum']} not within {theirs['enum']}"]
    errors: list[str] = []
    if kind == "array":
        errors += _subschema_errors(ours["items"], theirs["items"], f"{path}[]")
    elif "additionalProperties" in ours:
        errors += _subschema_errors(
            ours["additionalProperties"], theirs["additionalProperties"], f"{path}.*"
        )
    elif kind == "object":
        missing = set(theirs.get("required", [])) - set(ours["required"])
        errors += [f"{path}.{k}: required by the CRD, optional here" for k in sorted(missing)]
        for key, sub in ours["properties"].items():
            if key not in theirs.get("properties", {}):
                errors.append(f"{path}.{key}: not in the CRD")
            else:
                errors += _subschema_errors(sub, theirs["properties"][key], f"{path}.{key}")
    return errors


@pytest.mark.skipif(
    not os.environ.get("KUBERAY_CRD_DIR"),
    reason="set KUBERAY_CRD_DIR=<kuberay>/ray-operator/config/crd/bases to compare with the CRDs",
)
def test_schema_agrees_with_the_kuberay_crds() -> None:
    directory = Path(os.environ["KUBERAY_CRD_DIR"])
    errors = []
    for plural, ours in (("rayjobs", RAY_JOB_SPEC), ("rayclusters", RAY_CLUSTER_SPEC)):
        theirs = _crd_schema(directory, plural)["properties"]["spec"]
        errors += _subschema_errors(ours, theirs, plural)
    # The CRD types submissionMode as a plain string (the operator checks the value).
    assert [e for e in errors if "submissionMode" not in e] == []


# -- Dockerfile --------------------------------------------------------------------------------
def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, argument) pairs of infra/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (INFRA / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, argument = line.partition(" ")
            out.append((instruction.upper(), " ".join(argument.split())))
    return out


def _readme_install_command() -> str:
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up and run", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    (command,) = [line for line in setup.splitlines() if "pip install" in line]
    return " ".join(command.split())


def test_dockerfile_installs_the_project_as_the_readme_does() -> None:
    runs = [arg for ins, arg in _dockerfile() if ins == "RUN"]
    assert _readme_install_command() in runs
    section = _pyproject(r"^\[project\.optional-dependencies\]\n((?:.*\n)*?)\n*\[")
    extras = set(re.findall(r"^([a-z0-9_]+) = \[", section, re.MULTILINE))
    assert {"dev", "s3", "gcs"} <= extras
    for run in runs:
        for installed in re.findall(r'pip install -e "\.\[([a-z0-9_,]+)\]"', run):
            assert set(installed.split(",")) <= extras, run
        # every pip install runs in the README's virtual environment
        assert "pip install" not in run or ". .venv/bin/activate" in run, run


def test_dockerfile_base_matches_the_pins_and_runs_as_a_user() -> None:
    import torch

    instructions = _dockerfile()
    args = dict(a.split("=", 1) for ins, a in instructions if ins == "ARG" and "=" in a)
    base = args["BASE_IMAGE"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cu(\d+)", base)
    assert match, base
    ray_version, major, minor, cuda = match.groups()
    assert ray_version == _ray_pin()
    requires = _pyproject(r'^requires-python = "(.*)"')
    assert (int(major), int(minor)) >= tuple(int(x) for x in requires.lstrip(">=").split("."))
    # the CUDA of the torch wheel the pin installs (the base's CUDA must match it)
    assert torch.version.cuda is not None, "the installed torch is a CPU-only build"
    assert cuda == torch.version.cuda.replace(".", "")
    users = [a for ins, a in instructions if ins == "USER"]
    assert users and users[-1] not in ("root", "0")
    first_run = next(i for i, (ins, _) in enumerate(instructions) if ins == "RUN")
    assert any(ins == "USER" for ins, _ in instructions[:first_run])
    env = " ".join(a for ins, a in instructions if ins == "ENV")
    assert ".venv/bin:" in env  # `ray start` and the driver use the venv's Ray


# -- Ray cluster launcher ----------------------------------------------------------------------
def test_cluster_launcher_yaml_passes_rays_schema() -> None:
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    typo = {**config, "idle_timeout_minute": 5}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, schema)
    for name in ("gpu_worker", "gpu_spot_worker"):
        workers = config["available_node_types"][name]
        assert workers["resources"]["GPU"] >= 1
        assert 0 <= workers["min_workers"] < workers["max_workers"] <= config["max_workers"]
    spot = config["available_node_types"]["gpu_spot_worker"]["node_config"]
    assert spot["InstanceMarketOptions"]["MarketType"] == "spot"
    assert config["file_mounts"] == {}  # credentials are left to the user
