"""Deployment files, checked without a Docker engine: lint, Kubernetes schemas, and one install step."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.lifecycle import SHUTDOWN_OVERHEAD
from server import settings
from server.settings import default_cpu_threads, parse_args

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name) or str(BIN / name)
    if not Path(path).exists():
        pytest.fail(f"{name} is not installed (it is in the test extra)")
    return path


def test_dockerfile_passes_hadolint():
    result = subprocess.run([tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined, comments dropped."""
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", joined, re.M)]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for instruction, arguments in dockerfile_instructions():
        if instruction == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", arguments))
    return env


def pinned_torch(text: str) -> str:
    return re.search(r"torch==([\w.+]+)", text).group(1)


def test_dockerfile_runs_the_server_as_a_non_root_user_with_a_health_check():
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["tini", "--", "python", "-m", "server"]' in text  # tini forwards SIGTERM
    assert re.search(r"^USER 10001$", text, re.M) and "EXPOSE 8000" in text
    assert re.search(r"useradd .*--uid 10001", text)
    healthcheck = " ".join(a for i, a in dockerfile_instructions() if i == "HEALTHCHECK")
    # It follows REFORMER_PORT: a server moved to another port must not be reported dead.
    assert "/health" in healthcheck and "REFORMER_PORT" in healthcheck and ":8000" not in healthcheck
    assert dockerfile_env()["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/")


def test_everything_the_server_writes_goes_under_tmp():
    """The image runs with a read-only root filesystem and only /tmp writable (tmpfs or emptyDir)."""
    env = dockerfile_env()
    for name in ("HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR",
                 "PROMETHEUS_MULTIPROC_DIR"):
        assert env.get(name, "").startswith("/tmp/"), name
    assert re.search(r"useradd .*--home-dir /tmp/", (ROOT / "Dockerfile").read_text())


def test_image_installs_exactly_as_the_readme_says():
    install = re.search(r"^RUN (python3 -m venv .venv && .venv/bin/pip install .+?) &&",
                        (ROOT / "Dockerfile").read_text(), re.M).group(1)
    readme = (ROOT / "README.md").read_text()
    first_command = re.search(r"```sh\n(.+)\n", readme).group(1)
    assert first_command.startswith(install + " && .venv/bin/python -m server")
    assert install in (ROOT / ".ci" / "run").read_text()


def test_torch_comes_from_the_torch_index_alone():
    """A CPU build whose torch index cannot be reached must fail, not install PyPI's (CUDA) torch instead."""
    runs = [arguments for instruction, arguments in dockerfile_instructions() if instruction == "RUN"]
    torch_steps = [i for i, command in enumerate(runs) if re.search(r"pip install .*torch==", command)]
    readme_step = next(i for i, command in enumerate(runs) if ".venv/bin/pip install -e ." in command)
    assert len(torch_steps) == 1 and torch_steps[0] < readme_step
    torch_step = runs[torch_steps[0]]
    assert '--index-url "$TORCH_INDEX"' in torch_step and "--no-deps" in torch_step
    text = (ROOT / "Dockerfile").read_text()
    assert "extra-index-url" not in text.lower() and "PIP_EXTRA_INDEX_URL" not in text
    assert "PIP_FIND_LINKS" not in text
    # The same version as pyproject's pin, so the README install keeps it instead of fetching another.
    assert pinned_torch(torch_step) == pinned_torch((ROOT / "pyproject.toml").read_text())
    assert re.search(r"^ARG TORCH_INDEX=https://pypi.org/simple$", text, re.M)  # the GPU default: PyPI (CUDA)
    assert re.search(r"^ARG BASE=nvidia/cuda:13[\w.-]*ubuntu24\.04$", text, re.M)


def test_image_holds_the_runtime_only():
    sources = set()
    for instruction, arguments in dockerfile_instructions():
        if instruction in ("COPY", "ADD"):
            sources.update(arguments.split()[:-1])
    assert sources == {"pyproject.toml", "README.md", "model", "server", "export"}


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves `path` out: Docker's rules (the last matching pattern wins, `!`
    re-includes, `**` spans directories, a pattern that matches a directory leaves out its contents)."""

    def regex(pattern: str) -> re.Pattern:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i:end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return re.compile(out + "$")

    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for line in patterns:
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        if any(regex(pattern).match(prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_the_build_context_to_the_runtime():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    for path in (".git/config", ".venv/bin/python", ".pytest_cache/v/x", ".ruff_cache/x", "runs/step-100/x.pt",
                 "data/corpus.txt", "bench/results/image-cpu.json", "bench/loadtest/run.py", "loadtest/run.py",
                 "training/train.py", "tests/test_deploy.py", "model/__pycache__/engine.cpython-311.pyc",
                 "server/x.pyc", "reformer_server.egg-info/PKG-INFO", "build/lib/x.py", "dist/x.whl",
                 ".env", "bench/out/plot.png"):
        assert dockerignored(path, patterns), f"{path} would be sent to the builder"
    # ... and everything the Dockerfile copies is still there.
    kept = ["pyproject.toml", "README.md", "Dockerfile"]
    for package in ("model", "server", "export"):
        kept += [str(p.relative_to(ROOT)) for p in (ROOT / package).rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts]
    assert any(path.startswith("model/default/") for path in kept)
    assert [path for path in kept if dockerignored(path, patterns)] == []


def test_kubernetes_manifests_match_the_schemas(tmp_path):
    manifests = sorted(str(p) for p in (ROOT / "deploy" / "k8s").glob("*.yaml"))
    assert len(manifests) == 3
    result = subprocess.run([tool("kubernetes-validate"), "--strict", "-k", "1.30.0", *manifests],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = yaml.safe_load(Path(manifests[0]).read_text())  # the validator does reject a wrong manifest
    broken["spec"]["replicas"] = "one"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    rejected = subprocess.run([tool("kubernetes-validate"), "--strict", str(tmp_path / "broken.yaml")],
                              capture_output=True, text=True)
    assert rejected.returncode != 0


def test_probes_grace_and_compose_fit_the_drain():
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["startupProbe"]["httpGet"]["path"] == "/ready"  # the model is loaded and warm
    # A signal ends the server within the drain timeout plus the shutdown's fixed steps; the platform must
    # wait that long before its SIGKILL (tests/test_lifecycle.py measures the real time against the same sum).
    # and first its preStop pause, which lets the endpoint's removal reach the load balancers
    pause = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep" and int(pause[1]) >= 5
    assert pod["terminationGracePeriodSeconds"] >= int(pause[1]) + int(env["REFORMER_DRAIN_TIMEOUT"]) + \
        SHUTDOWN_OVERHEAD
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]["reformer"]
    drain = int(compose["environment"]["REFORMER_DRAIN_TIMEOUT"])
    assert int(compose["stop_grace_period"].rstrip("s")) >= drain + SHUTDOWN_OVERHEAD
    assert compose["restart"] == "unless-stopped"  # an engine that keeps dying exits 1: start it again
    hpa = yaml.safe_load((ROOT / "deploy" / "k8s" / "hpa.yaml").read_text())
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "reformer_requests_waiting"


def restricted_violations(pod: dict) -> list[str]:
    """What the "restricted" Pod Security Standard (Kubernetes 1.30) refuses in a pod spec."""
    found = []
    pod_context = pod.get("securityContext", {})
    if any(pod.get(key) for key in ("hostNetwork", "hostPID", "hostIPC")):
        found.append("host namespaces")
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}
    for volume in pod.get("volumes", []):
        if not set(volume) - {"name"} <= allowed_volumes:
            found.append(f"volume {volume['name']}")
    for container in pod.get("initContainers", []) + pod["containers"]:
        context = container.get("securityContext", {})
        name = container["name"]

        def setting(key):
            return context.get(key, pod_context.get(key))

        if context.get("privileged"):
            found.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation must be false")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []) or set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities must drop ALL")
        if setting("runAsNonRoot") is not True or setting("runAsUser") == 0:
            found.append(f"{name}: must run as non-root")
        if (setting("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{name}: hostPort")
    return found


def test_deployment_is_admitted_by_the_restricted_pod_security_standard():
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    assert restricted_violations(pod) == []
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    # The checker does refuse a pod that breaks the standard.
    assert restricted_violations({"containers": [{"name": "c"}]})
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_deployment_leaves_the_replica_count_to_the_autoscaler():
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    assert "replicas" not in deployment["spec"]  # every apply would reset what the HPA chose
    hpa = yaml.safe_load((ROOT / "deploy" / "k8s" / "hpa.yaml").read_text())
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_only_tmp_is_writable_and_holds_the_metrics():
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert all(not m.get("readOnly") for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    multiproc = dockerfile_env()["PROMETHEUS_MULTIPROC_DIR"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env.get("PROMETHEUS_MULTIPROC_DIR", multiproc).startswith("/tmp/")


def test_compose_runs_read_only_without_privileges():
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]["reformer"]
    assert compose["read_only"] is True
    tmp = [entry for entry in compose["tmpfs"] if entry.split(":")[0] == "/tmp"]
    # Triton loads the launchers it compiles from its cache under /tmp: the tmpfs must allow exec.
    assert len(tmp) == 1 and "noexec" not in tmp[0] and "exec" in tmp[0].split(":")[1].split(",")
    assert compose["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in compose["security_opt"]
    test = " ".join(compose["healthcheck"]["test"])
    assert "REFORMER_PORT" in test and ":8000" not in test and "/ready" in test


def test_image_name_is_one_placeholder_for_compose_and_kubernetes():
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]["reformer"]
    assert image == compose["image"] == "registry.example.com/reformer-server:0.1.0"
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert image.endswith(":" + version)
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert "registry.example.com/reformer-server" in readme and "push" in readme


def test_check_image_script_is_valid_bash():
    script = ROOT / "deploy" / "check_image.sh"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text and "trap cleanup EXIT" in text
    assert script.stat().st_mode & 0o111  # executable
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    assert "check_image.sh" in (ROOT / "deploy" / "README.md").read_text()


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("REFORMER_MAX_RUNNING", "32")
    monkeypatch.setenv("REFORMER_HOST", "0.0.0.0")
    monkeypatch.setenv("REFORMER_API_KEY", "secret")
    settings = parse_args([])
    assert (settings.max_running, settings.host, settings.api_key) == (32, "0.0.0.0", "secret")
    assert parse_args(["--max-running", "4"]).max_running == 4  # the command line wins
    monkeypatch.setenv("REFORMER_MAX_RUNNING", "many")
    with pytest.raises(SystemExit):
        parse_args([])


def test_the_model_leaves_a_core_to_each_http_process_on_cpu(monkeypatch):
    """With every core, the model's threads starved the event loop that streams its tokens (requests waited
    seconds behind one stream on two cores)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))  # a container's cpuset of 8
    monkeypatch.setattr(settings, "CPU_MAX", Path("/nonexistent/cpu.max"))  # and no quota
    assert parse_args([]).model_threads == 7
    assert parse_args(["--api-servers", "3"]).model_threads == 5
    assert parse_args(["--cpu-threads", "8"]).model_threads == 8  # the operator's choice wins
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert parse_args([]).model_threads == 1
    assert parse_args(["--api-servers", "4"]).model_threads == 1
    with pytest.raises(SystemExit):
        parse_args(["--cpu-threads", "0"])


def test_a_cpu_quota_limits_the_model_threads_as_the_cpuset_does(monkeypatch, tmp_path):
    """`docker --cpus 2.5` or a Kubernetes CPU limit of 2500m leaves every core in the affinity set."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(settings, "CPU_MAX", quota)
    quota.write_text("250000 100000\n")
    assert default_cpu_threads(1) == 2  # 3 cores' worth, one of them for the HTTP process
    quota.write_text("max 100000\n")
    assert default_cpu_threads(1) == 63
    quota.unlink()
    assert default_cpu_threads(1) == 63


def test_more_embedding_inputs_than_chunks_is_refused_at_start_up():
    """Each input is at least one chunk: 4,097 inputs would get a 400 about chunking they never asked for."""
    assert parse_args(["--max-embedding-inputs", "4096"]).max_embedding_inputs == 4096
    with pytest.raises(SystemExit):
        parse_args(["--max-embedding-inputs", "4097"])
