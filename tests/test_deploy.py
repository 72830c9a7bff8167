"""Deployment files, checked without a Docker engine: lint, Kubernetes schemas, and one install step."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.lifecycle import SHUTDOWN_OVERHEAD
from server.settings import parse_args

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


def test_dockerfile_runs_the_server_as_a_non_root_user_with_a_health_check():
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["tini", "--", "python", "-m", "server"]' in text  # tini forwards SIGTERM
    assert re.search(r"^USER 10001$", text, re.M) and "EXPOSE 8000" in text
    assert "HEALTHCHECK" in text and "/health" in text and "PROMETHEUS_MULTIPROC_DIR" in text


def test_image_installs_exactly_as_the_readme_says():
    install = re.search(r"^RUN (python3 -m venv .venv && .venv/bin/pip install .+?) &&",
                        (ROOT / "Dockerfile").read_text(), re.M).group(1)
    readme = (ROOT / "README.md").read_text()
    first_command = re.search(r"```sh\n(.+)\n", readme).group(1)
    assert first_command.startswith(install + " && .venv/bin/python -m server")
    assert install in (ROOT / ".ci" / "run").read_text()


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
    # A signal ends the server within the drain timeout plus the shutdown's fixed steps; the platform must
    # wait that long before its SIGKILL (tests/test_lifecycle.py measures the real time against the same sum).
    assert pod["terminationGracePeriodSeconds"] >= int(env["REFORMER_DRAIN_TIMEOUT"]) + SHUTDOWN_OVERHEAD
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]["reformer"]
    drain = int(compose["environment"]["REFORMER_DRAIN_TIMEOUT"])
    assert int(compose["stop_grace_period"].rstrip("s")) >= drain + SHUTDOWN_OVERHEAD
    assert compose["restart"] == "unless-stopped"  # an engine that keeps dying exits 1: start it again
    hpa = yaml.safe_load((ROOT / "deploy" / "k8s" / "hpa.yaml").read_text())
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "reformer_requests_waiting"


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
