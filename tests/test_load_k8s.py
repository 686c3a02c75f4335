"""deploy/k8s: the Kubernetes manifests of a distributed load, checked without a cluster (none
runs here): parsed with PyYAML, their wiring checked (the Service the pods load, the volume the
histograms go to and the merge reads), then their commands run on this host as the pods would:
a server, two load clients writing to one directory, the merge pod's shell line over it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from cli_run import CONSOLE_SCRIPT, RUN_TIMEOUT, serve

from viowire.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "deploy" / "k8s" / "load-job.yaml"
MERGE = ROOT / "deploy" / "k8s" / "load-merge.yaml"
PODS = 2  # load pods run here (the manifest's parallelism is for a cluster)


def manifests(path: Path) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text())}


def container(pod_spec: dict) -> dict:
    (only,) = pod_spec["containers"]
    return only


def test_the_manifests_wire_a_job_of_load_pods_to_a_server_and_a_volume():
    job_file = manifests(JOB)
    assert set(job_file) == {"Service", "Deployment", "PersistentVolumeClaim", "Job"}
    service, server, claim, job = (
        job_file[k] for k in ("Service", "Deployment", "PersistentVolumeClaim", "Job")
    )
    # the Service selects the server's pods and forwards the port it listens on
    pod = server["spec"]["template"]
    assert service["spec"]["selector"] == pod["metadata"]["labels"]
    serve_args = container(pod["spec"])["args"]
    (port,) = service["spec"]["ports"]
    assert f"tcp://0.0.0.0:{port['targetPort']}" in serve_args and "--no-shm" in serve_args
    assert build_parser().parse_args(serve_args).command == "serve"

    spec = job["spec"]
    assert spec["parallelism"] == spec["completions"] >= 2 and spec["backoffLimit"] == 0
    template = spec["template"]["spec"]
    assert template["restartPolicy"] == "Never"
    load = container(template)
    target = f"tcp://{service['metadata']['name']}:{port['port']}"
    args = build_parser().parse_args(load["args"])
    assert (args.command, args.url, args.memory) == ("load", target, "proxied")
    assert args.duration and args.no_progress
    (wait,) = template["initContainers"]
    assert target in wait["command"][-1] and "viowire probe" in wait["command"][-1]

    # the histograms go to a directory on the claim, where the merge pod reads them
    (mount,) = load["volumeMounts"]
    (volume,) = template["volumes"]
    assert volume["name"] == mount["name"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    assert args.histogram_out == mount["mountPath"] + "/"
    merge = manifests(MERGE)["Pod"]
    merger = container(merge["spec"])
    (merge_volume,) = merge["spec"]["volumes"]
    assert merge_volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (merge_mount,) = merger["volumeMounts"]
    assert merger["command"][:2] == ["sh", "-c"]
    assert merger["command"][2] == f"viowire load merge {merge_mount['mountPath']}/*.json"
    # the image's user (uid 10001, Dockerfile) may write to the volume
    assert template["securityContext"]["fsGroup"] == 10001
    assert "--uid 10001" in (ROOT / "Dockerfile").read_text()


def test_the_pods_commands_run_here(tmp_path):
    job = manifests(JOB)
    server_args = container(job["Deployment"]["spec"]["template"]["spec"])["args"]
    template = job["Job"]["spec"]["template"]["spec"]
    load_args = container(template)["args"]
    mount = container(template)["volumeMounts"][0]["mountPath"]
    results = tmp_path / "results"
    listen = next(a for a in server_args if a.startswith("tcp://0.0.0.0:"))
    assert server_args[0] == "serve"
    with serve(*["tcp://127.0.0.1:0" if a == listen else a for a in server_args[1:]]) as served:
        url = served.url("tcp")
        here = [
            url if a.startswith("tcp://viowire-server:") else a.replace(mount, str(results))
            for a in load_args
        ]
        here[here.index("--duration") + 1] = "1"
        pods = [
            subprocess.Popen(
                [str(CONSOLE_SCRIPT), *here],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(PODS)
        ]
        try:
            outputs = [pod.communicate(timeout=RUN_TIMEOUT) for pod in pods]
        finally:
            for pod in pods:
                if pod.poll() is None:
                    pod.kill()
                    pod.wait(timeout=5)
    for pod, (out, err) in zip(pods, outputs, strict=True):
        assert pod.returncode == 0, err + out
    files = sorted(results.glob("*.json"))
    assert len(files) == PODS
    merge_line = container(manifests(MERGE)["Pod"]["spec"])["command"][2]
    merge_line = merge_line.replace("viowire ", f"{CONSOLE_SCRIPT} ", 1).replace(
        mount, str(results)
    )
    merged = subprocess.run(
        ["sh", "-c", merge_line], capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    assert merged.returncode == 0, merged.stderr
    assert re.search(rf"^merged +{PODS} runs", merged.stdout, re.M), merged.stdout
    requests = [int(re.search(r"^workload .*: ([\d,]+) requests", out, re.M)[1].replace(",", ""))
                for out, _ in outputs]  # fmt: skip
    assert re.search(rf"^workload .*: {sum(requests):,} requests", merged.stdout, re.M)
