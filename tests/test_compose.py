"""docker-compose.yml and the Dockerfile, checked without a Docker engine: their structure, and
every command in them run for real with the installed ``viowire`` on this host (the server on
127.0.0.1 and a port of its own, the clients against it, the load clients scaled to two)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from cli_run import CONSOLE_SCRIPT, RUN_TIMEOUT, START_TIMEOUT, serve

from viowire.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CLIENTS = ("conform", "load", "console")
NETPEER = "netpeer"  # runs docker/netpeer.sh (net-attach, then ping), not a viowire command
NETPEER_SCRIPT = ROOT / "docker" / "netpeer.sh"
SCALE = {"load": 2}  # as `docker compose up --scale load=2`
HEALTH_INTERVAL = 0.2


# A reader for the YAML that docker-compose.yml uses, so the test needs no PyYAML: block mappings,
# block sequences of scalars, flow sequences of double-quoted strings, comments. Anything else
# (anchors, flow mappings, multi-line scalars, YAML 1.1 booleans) is refused, not guessed at.


class YamlSubsetError(ValueError):
    pass


_KEY = re.compile(r"([A-Za-z0-9_.-]+):(?: +(.*))?")
_AMBIGUOUS = re.compile(r"(?i)yes|no|on|off|y|n|[-+]?(\d+\.\d*|\.\d+)([eE][-+]?\d+)?")
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def load_yaml(text: str) -> Any:
    lines = _lines(text)
    if not lines:
        return None
    if lines[0][1] != 0:
        raise YamlSubsetError(f"line {lines[0][0]}: the document must start in column 0")
    value, end = _block(lines, 0, 0)
    if end != len(lines):
        raise YamlSubsetError(f"line {lines[end][0]}: indentation matches no enclosing block")
    return value


def _lines(text: str) -> list[tuple[int, int, str]]:
    """(line number, indent, text) of each line that holds more than a comment."""
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        body = _strip_comment(raw).rstrip()
        indent = len(body) - len(body.lstrip(" "))
        if body[indent : indent + 1] == "\t":
            raise YamlSubsetError(f"line {number}: a tab in the indentation")
        if body.strip():
            lines.append((number, indent, body.strip()))
    return lines


def _strip_comment(line: str) -> str:
    i, quote = 0, None
    while i < len(line):
        ch = line[i]
        if quote:
            if quote == '"' and ch == "\\":
                i += 1  # an escaped character: not the closing quote
            elif ch == quote:
                quote = None
        elif ch in "\"'" and line[:i].rstrip()[-1:] in ("", ":", "-", "[", ","):
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] == " "):
            return line[:i]
        i += 1
    return line


def _block(lines: list[tuple[int, int, str]], i: int, indent: int) -> tuple[Any, int]:
    text = lines[i][2]
    if text == "-" or text.startswith("- "):
        return _sequence(lines, i, indent)
    return _mapping(lines, i, indent)


def _sequence(lines, i: int, indent: int) -> tuple[list[Any], int]:
    items = []
    while i < len(lines) and lines[i][1] == indent:
        number, _, text = lines[i]
        if not text.startswith("- "):
            raise YamlSubsetError(f"line {number}: expected '- item': {text!r}")
        items.append(_scalar(text[2:].strip(), number))
        i += 1
    _no_deeper(lines, i, indent)
    return items, i


def _mapping(lines, i: int, indent: int) -> tuple[dict[str, Any], int]:
    result: dict[str, Any] = {}
    while i < len(lines) and lines[i][1] == indent:
        number, _, text = lines[i]
        match = _KEY.fullmatch(text)
        if not match:
            raise YamlSubsetError(f"line {number}: expected 'key: value': {text!r}")
        key, rest = match.groups()
        if key in result:
            raise YamlSubsetError(f"line {number}: {key!r} given twice")
        i += 1
        if rest:
            result[key] = _scalar(rest, number)
        elif i < len(lines) and lines[i][1] > indent:
            result[key], i = _block(lines, i, lines[i][1])
        else:
            result[key] = None
    _no_deeper(lines, i, indent)
    return result, i


def _no_deeper(lines, i: int, indent: int) -> None:
    if i < len(lines) and lines[i][1] > indent:
        raise YamlSubsetError(f"line {lines[i][0]}: unexpected indentation")


def _scalar(text: str, number: int) -> Any:
    try:
        if text.startswith('"'):
            return _typed(json.loads(text), str, number)
        if text.startswith("["):
            items = _typed(json.loads(text), list, number)
            return [_typed(item, str, number) for item in items]
    except json.JSONDecodeError as exc:
        raise YamlSubsetError(f"line {number}: {text!r} is outside the subset: {exc}") from None
    if text.startswith("'") and text.endswith("'") and len(text) > 1:
        return text[1:-1].replace("''", "'")
    if text[0] in "{&*!|>%@`'" or ": " in text or text.endswith(":") or _AMBIGUOUS.fullmatch(text):
        raise YamlSubsetError(f"line {number}: {text!r} is outside the subset; quote it")
    if re.fullmatch(r"[-+]?\d+", text):
        return int(text)
    return {"true": True, "false": False, "null": None, "~": None}.get(text, text)


def _typed(value: Any, kind: type, number: int) -> Any:
    if not isinstance(value, kind):
        raise YamlSubsetError(f"line {number}: {value!r} is not a {kind.__name__}")
    return value


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${NAME:-default}``, from ``env`` (not this process's environment)."""

    def value(match: re.Match[str]) -> str:
        name, default = match.groups()
        if env and name in env:
            return env[name]
        if default is None:
            raise YamlSubsetError(f"${{{name}}} has no default")
        return default

    return _INTERPOLATION.sub(value, text)


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    return load_yaml(interpolate(COMPOSE_FILE.read_text(), env))


def argv(value: str | list[str]) -> list[str]:
    return value.split() if isinstance(value, str) else list(value)


def server_port() -> int:
    listen = argv(compose()["services"]["server"]["command"])
    url = listen[listen.index("--listen") + 1]
    match = re.fullmatch(r"tcp://0\.0\.0\.0:(\d+)", url)
    assert match, f"the server listens on {url}, not on every interface of its container"
    return int(match.group(1))


# The Dockerfile, as instructions: (KEYWORD, arguments), continuations joined, comments dropped.


def dockerfile() -> list[tuple[str, str]]:
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#") or not (pending or line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def instruction(keyword: str) -> list[str]:
    return [args for key, args in dockerfile() if key == keyword]


def exec_form(keyword: str) -> list[str]:
    (args,) = instruction(keyword)[-1:]
    value = json.loads(args)
    assert isinstance(value, list), f"{keyword} {args}: give the exec form, a JSON list"
    return value


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` out of the build context (last matching rule wins;
    a rule that matches a parent directory matches everything under it)."""
    ignored = False
    parents = [str(Path(*Path(path).parts[: n + 1])) for n in range(len(Path(path).parts))]
    for rule in DOCKERIGNORE.read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negated = rule.startswith("!")
        pattern = rule.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex.replace(r"\?", "[^/]"), p) for p in parents):
            ignored = not negated
    return ignored


# The reader itself.


def test_yaml_reader_reads_the_subset_and_refuses_the_rest():
    text = """
a:  # comment
  b: "x # not a comment"
  c:
    - one
    - "7000:7000"
  d: ["CMD", "x"]
  e: 10
  f: 2s
  g: 'it''s'
"""
    assert load_yaml(text) == {
        "a": {
            "b": "x # not a comment",
            "c": ["one", "7000:7000"],
            "d": ["CMD", "x"],
            "e": 10,
            "f": "2s",
            "g": "it's",
        }
    }
    for bad in ("a: &x 1", "a: {b: 1}", "a: |", "a: yes", "a: 1.5", "a:\n  b: 1\n c: 2", "- a: 1"):
        with pytest.raises(YamlSubsetError):
            load_yaml(bad)
    assert interpolate("${X:-tcp://a:1}") == "tcp://a:1"
    assert interpolate("${X:-tcp://a:1}", {"X": "tcp://b:2"}) == "tcp://b:2"


def test_yaml_reader_agrees_with_pyyaml():
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (the reader does without)")
    text = interpolate(COMPOSE_FILE.read_text())
    assert load_yaml(text) == yaml.safe_load(text)


# docker-compose.yml


def test_a_server_with_a_healthcheck_and_clients_that_wait_for_it():
    services = compose()["services"]
    assert set(services) == {"server", *CLIENTS, NETPEER}
    server = services["server"]
    assert server["build"] == {"context": ".", "args": {"BASE": "python:3.11-slim"}}
    assert compose({"BASE": "b:1"})["services"]["server"]["build"]["args"] == {"BASE": "b:1"}
    for name, service in services.items():  # PID 1 an init: SIGTERM stops every service at once
        assert service["init"] is True, name
    test = server["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "viowire"
    for key in ("interval", "timeout", "start_period"):
        assert re.fullmatch(r"\d+s", server["healthcheck"][key]), key
    assert server["healthcheck"]["retries"] > 0
    for name in CLIENTS:
        client = services[name]
        assert client["image"] == server["image"], f"{name} runs the image the server builds"
        assert client["depends_on"] == {"server": {"condition": "service_healthy"}}, name
        # Scalable with --scale: no fixed name, no host port to collide on.
        assert "container_name" not in client and "ports" not in client, name


def test_one_port_everywhere():
    port = server_port()
    services = compose()["services"]
    # published on the host's loopback only
    assert services["server"]["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert compose({"VIOWIRE_PORT": "7777"})["services"]["server"]["ports"] == [
        f"127.0.0.1:7777:{port}"
    ]
    assert f"tcp://127.0.0.1:{port}" in services["server"]["healthcheck"]["test"]
    for name in CLIENTS:
        assert f"tcp://server:{port}" in argv(services[name]["command"]), name
    assert str(port) in " ".join(instruction("EXPOSE")).split()


def test_clients_can_be_pointed_at_a_server_elsewhere():
    target = "tcp://10.1.2.3:7000"
    services = compose({"VIOWIRE_TARGET": target})["services"]
    for name in CLIENTS:
        assert target in argv(services[name]["command"]), name


def test_guest_memory_is_proxied_across_containers():
    """Same kernel (same boot id), separate /dev/shm: named segments cannot work, so the server
    does not offer them and every client asks for proxied memory outright."""
    services = compose()["services"]
    assert "--no-shm" in argv(services["server"]["command"])
    for name, command in [
        ("healthcheck", services["server"]["healthcheck"]["test"][2:]),
        *((name, argv(services[name]["command"])) for name in CLIENTS),
    ]:
        assert command[command.index("--memory") + 1] == "proxied", name


def test_every_command_is_one_the_viowire_cli_accepts():
    services = compose()["services"]
    commands = [argv(services[name]["command"]) for name in ("server", *CLIENTS)] + [
        netpeer_attach_command(),
        services["server"]["healthcheck"]["test"][2:],
        exec_form("CMD"),
    ]
    for command in commands:
        args = build_parser().parse_args(command)
        assert args.command == command[0]


def docker_compose() -> list[str] | None:
    """How this host runs Compose, if it does: the docker plugin or the standalone command."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]):
            version = subprocess.run(
                [*command, "version"], capture_output=True, timeout=30, check=False
            )
            if version.returncode == 0:
                return command
    return None


def test_docker_compose_config_accepts_the_file():
    """Compose's own reading of the file (no Docker engine needed)."""
    command = docker_compose()
    if command is None:
        pytest.skip(
            "no Docker Compose on this host (`docker compose` or docker-compose; "
            "scripts/install-test-tools installs it)"
        )
    result = subprocess.run(
        [*command, "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# Dockerfile and .dockerignore


def test_the_image_installs_the_package_and_runs_the_console_script():
    (base,) = instruction("FROM")
    assert base == "${BASE}", "FROM ${BASE}: buildable where no registry is reachable"
    (arg,) = [a for a in instruction("ARG") if a.startswith("BASE=")]
    assert dockerfile().index(("ARG", arg)) < dockerfile().index(("FROM", base))
    base = arg.removeprefix("BASE=")
    match = re.fullmatch(r"python:3\.(\d+)(-slim\S*)?", base)
    assert match and int(match.group(1)) >= 11, f"FROM {base}: Python 3.11+ (requires-python)"
    copied = {src for args in instruction("COPY") for src in args.split()[:-1] if src[:2] != "--"}
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], "viowire"}
    assert needed <= copied, f"pip install . needs {needed - copied}"
    assert any(re.search(r"\bpip install \.(\s|$)", run) for run in instruction("RUN"))
    user = instruction("USER")[-1]
    assert user not in ("root", "0"), "the image runs as a user of its own"
    assert exec_form("ENTRYPOINT") == ["viowire"]
    assert PYPROJECT["project"]["scripts"]["viowire"] == "viowire.cli:main"


def test_the_build_context_holds_what_pip_install_reads_and_little_else():
    for path in ("pyproject.toml", "README.md", "viowire/cli.py", "viowire/protocol/codec.py"):
        assert not dockerignored(path), path
    for path in (".git/HEAD", "tests/test_cli.py", ".venv/bin/python", "viowire/__pycache__/x.pyc"):
        assert dockerignored(path), path


# Every command, run here.


def local(command: list[str], url: str, volumes: dict[str, Path] | None = None) -> list[str]:
    """A service's command as it runs on this host: the console script for ``viowire``, the
    server at ``url`` for the compose names of it, a one-second load, and each volume's mount
    point (a path prefix) in ``volumes`` replaced by a directory here."""
    port = server_port()
    out = [str(CONSOLE_SCRIPT)] + [
        url if arg in (f"tcp://server:{port}", f"tcp://127.0.0.1:{port}") else arg
        for arg in command
    ]
    for mount, here in (volumes or {}).items():
        out = [f"{here}/{arg[len(mount) :]}" if arg.startswith(mount) else arg for arg in out]
    if "--duration" in out:
        out[out.index("--duration") + 1] = "1"
    return out


def wait_healthy(test: list[str], url: str) -> subprocess.CompletedProcess[str]:
    assert CONSOLE_SCRIPT.exists(), f"{CONSOLE_SCRIPT}: pip install -e . makes it"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        result = subprocess.run(
            local(test[2:], url), capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
        )
        if result.returncode == 0 or time.monotonic() > deadline:
            return result
        time.sleep(HEALTH_INTERVAL)


def use_a_token(tmp_path, monkeypatch) -> None:
    """What the compose secret gives every service: VIOWIRE_TOKEN_FILE naming the token."""
    token = tmp_path / "viowire.token"
    token.write_text("0123456789abcdef0123456789abcdef\n")
    monkeypatch.setenv("VIOWIRE_TOKEN_FILE", str(token))
    monkeypatch.delenv("VIOWIRE_TOKEN", raising=False)


def test_every_service_proves_the_token_from_a_compose_secret():
    config = compose()
    assert config["secrets"] == {"viowire_token": {"file": "./viowire.token"}}
    assert compose({"VIOWIRE_TOKEN_FILE": "/k/t"})["secrets"]["viowire_token"]["file"] == "/k/t"
    for name, service in config["services"].items():
        assert service["secrets"] == ["viowire_token"], name
        assert service["environment"]["VIOWIRE_TOKEN_FILE"] == "/run/secrets/viowire_token", name
    # the healthcheck runs in the server's container, with its environment
    assert "--token-file" not in config["services"]["server"]["healthcheck"]["test"]
    assert "viowire.token" in (ROOT / ".gitignore").read_text().split()
    assert dockerignored("viowire.token")


def test_the_services_run_here(tmp_path, monkeypatch):
    use_a_token(tmp_path, monkeypatch)
    services = compose()["services"]
    assert exec_form("ENTRYPOINT") == ["viowire"]
    serve_command = argv(services["server"]["command"])
    assert serve_command[0] == "serve"
    listen = f"tcp://0.0.0.0:{server_port()}"
    with serve(*[a if a != listen else "tcp://127.0.0.1:0" for a in serve_command[1:]]) as served:
        url = served.url("tcp")
        health = wait_healthy(services["server"]["healthcheck"]["test"], url)
        assert health.returncode == 0, health.stderr
        assert health.stdout.count("virtio-blk") == 2 and health.stdout.count("virtio-rng") == 2
        assert health.stdout.count("virtio-net") == 1
        assert health.stdout.count("virtio-console") == 1
        # A client without the token gets nothing.
        env = {k: v for k, v in os.environ.items() if k != "VIOWIRE_TOKEN_FILE"}
        refused = subprocess.run(
            local(services["server"]["healthcheck"]["test"][2:], url),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
            env=env,
        )
        assert refused.returncode == 1 and "requires a token" in refused.stderr

        # As across containers: the server maps no client's /dev/shm segment, and a client that
        # insists on shared memory is told to proxy it.
        shared = subprocess.run(
            [str(CONSOLE_SCRIPT), "probe", "--memory", "shared", url],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        assert shared.returncode == 1 and "use --memory proxied" in shared.stderr

        runs = []
        for name in CLIENTS:
            for replica in range(1, SCALE.get(name, 1) + 1):
                out = tmp_path / f"{name}-{replica}.out"
                err = tmp_path / f"{name}-{replica}.err"
                with out.open("w") as stdout, err.open("w") as stderr:
                    mounts = [v.split(":") for v in services[name].get("volumes", [])]
                    volumes = {target: tmp_path / source for source, target in mounts}
                    command = local(argv(services[name]["command"]), url, volumes)
                    proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
                runs.append((f"{name}-{replica}", proc, out, err))
        try:
            for _, proc, _, _ in runs:
                proc.wait(timeout=RUN_TIMEOUT)
        finally:
            for _, proc, _, _ in runs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=5)

    outputs = {
        name: (proc.returncode, out.read_text(), err.read_text()) for name, proc, out, err in runs
    }
    for name, (code, stdout, stderr) in outputs.items():
        assert code == 0, f"{name} exited with {code}: {stderr}{stdout[-2000:]}"
    assert re.search(r"^6 device\(s\), \d+ checks: .* 0 FAIL", outputs["conform-1"][1], re.M)
    # the console session: what the program on the port's host side wrote (uname -a)
    assert outputs["console-1"][1].startswith(os.uname().sysname), outputs["console-1"]
    for replica in ("load-1", "load-2"):
        stdout = outputs[replica][1]
        assert ": proxied memory," in stdout.splitlines()[0], stdout
        assert re.search(r"^result +OK", stdout, re.M), stdout
    # The replicas' histogram files on the shared volume, merged as the compose file says.
    histograms = sorted((tmp_path / "load-results").glob("load-*.json"))
    assert len(histograms) == 2
    merged = subprocess.run(
        [str(CONSOLE_SCRIPT), "load", "merge", *map(str, histograms)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
    )  # fmt: skip
    assert merged.returncode == 0, merged.stderr
    assert re.search(r"^merged +2 runs", merged.stdout, re.M), merged.stdout
    assert "load merge /results/*.json" in COMPOSE_FILE.read_text()


# The netpeer service: containers on one virtio-net link.


def netpeer_attach_command() -> list[str]:
    """The ``viowire net-attach`` line of docker/netpeer.sh, its shell variables filled in."""
    (line,) = [ln for ln in NETPEER_SCRIPT.read_text().splitlines() if "viowire net-attach" in ln]
    words = line.strip().rstrip("&").replace('"$target"', "tcp://server:7000").split()
    return words[1:]


def test_netpeers_attach_a_net_device_of_the_server_in_their_own_namespace():
    services = compose()["services"]
    peer = services[NETPEER]
    assert peer["image"] == services["server"]["image"]
    assert peer["depends_on"] == {"server": {"condition": "service_healthy"}}
    assert "container_name" not in peer and "ports" not in peer  # scalable
    # A TAP needs CAP_NET_ADMIN (in the container's own network namespace) and /dev/net/tun;
    # the image's user has no capabilities, root in the container has the ones added.
    assert peer["cap_add"] == ["NET_ADMIN"] and peer["devices"] == ["/dev/net/tun"]
    assert peer["user"] == "0"
    assert peer["sysctls"] == {"net.ipv4.icmp_echo_ignore_broadcasts": "0"}
    (mount,) = peer["volumes"]
    source, target, mode = mount.split(":")
    assert (ROOT / source).resolve() == NETPEER_SCRIPT and mode == "ro"
    assert peer["entrypoint"] == ["sh", target]
    assert peer["environment"]["VIOWIRE_TARGET"] == f"tcp://server:{server_port()}"
    assert compose({"VIOWIRE_TARGET": "tcp://h:1"})["services"][NETPEER]["environment"] == {
        "VIOWIRE_TARGET": "tcp://h:1",
        "VIOWIRE_TOKEN_FILE": "/run/secrets/viowire_token",
    }
    serve_args = argv(services["server"]["command"])
    assert "net,link=lan" in serve_args
    attach = build_parser().parse_args(netpeer_attach_command())
    assert (attach.command, attach.tap, attach.memory) == ("net-attach", "vw0", "proxied")
    # the image has what the script runs besides viowire
    assert any("iproute2" in run and "iputils-ping" in run for run in instruction("RUN"))


def test_netpeers_ping_each_other_here_in_network_namespaces(tmp_path, monkeypatch):
    """The server's command in namespace S, docker/netpeer.sh in C1 and C2 (as two replicas of
    the netpeer service; their sysctls from the compose file): each finds the other on the
    overlay and pings it, all 10 pings back. The overlay 10.204.0.0/16 is unreachable from the
    root namespace."""
    from netns import Topology, require_netns, stderr_of, stdout_of

    require_netns("ping")
    use_a_token(tmp_path, monkeypatch)  # the server listens on 0.0.0.0 (in its namespace)
    services = compose()["services"]
    peer = services[NETPEER]
    with Topology(["server", "c1", "c2"], "10.203.43", unreachable=["10.204.0.0/16"]) as topo:
        topo.check_routes(["10.204.0.1", "10.204.255.254", "10.204.255.255"])
        serve_command = [str(CONSOLE_SCRIPT), *argv(services["server"]["command"])]
        topo.start("server", serve_command, r"^listening on tcp://0\.0\.0\.0:")
        env = {
            **os.environ,
            "PATH": f"{CONSOLE_SCRIPT.parent}:{os.environ['PATH']}",
            "VIOWIRE_TARGET": f"tcp://{topo.ips['server']}:{server_port()}",
            "NETPEER_LINGER": "3",
        }
        procs = []
        for name in ("c1", "c2"):
            for key, value in peer["sysctls"].items():
                topo.run(name, ["sysctl", "-qw", f"{key}={value}"], check=True)
            proc, _ = topo.start(name, ["sh", str(NETPEER_SCRIPT)], r"^netpeer: vw0 ", env=env)
            procs.append(proc)
        for proc in procs:
            code = proc.wait(timeout=40)
            out = stdout_of(proc)
            print(out)
            assert code == 0, f"netpeer exited with {code}: {out}{stderr_of(proc)}"
            assert re.search(r" 0% packet loss", out), out


# The whole file on a real Docker engine: scripts/compose-test.

COMPOSE_TEST = ROOT / "scripts" / "compose-test"
COMPOSE_TEST_TIMEOUT = 600  # about 85 s from nothing on 2 busy cores; the base image is most
CANNOT_RUN_HERE = 77  # compose-test's exit status when this machine cannot run it
ENGINE_STATUS = (
    Path(os.environ.get("VIOWIRE_CACHE") or Path.home() / ".cache" / "viowire") / "docker-engine"
)  # what scripts/install-test-tools wrote: "ok", or why the engine was not installed


def engine_install_note() -> str:
    try:
        status = ENGINE_STATUS.read_text().strip()
    except OSError:
        return "scripts/install-test-tools has not been run here (it installs docker.io)"
    return "" if status == "ok" else f"scripts/install-test-tools: {status}"


def compose_test_args() -> list[str] | str:
    """How scripts/compose-test can run here (its arguments), or why it cannot."""
    if os.environ.get("VIOWIRE_COMPOSE_TEST") == "0":
        return "VIOWIRE_COMPOSE_TEST=0 turns it off"
    if docker_compose() is None:
        return "no docker-compose (scripts/install-test-tools installs it)"
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode == 0:
        return []  # an engine runs here: use it
    missing = [
        t for t in ("dockerd", "mmdebstrap") if not shutil.which(t, path="/usr/sbin:/usr/bin")
    ]
    if missing or os.geteuid() != 0:
        why = f"{' and '.join(missing)} not installed" if missing else "not root"
        note = engine_install_note()
        return f"no Docker engine runs here, and none can be started ({why})" + (
            f"; {note}" if note else ""
        )
    if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() != "0":
        return "IPv4 forwarding is on: compose-test starts no engine then (packets could leave)"
    return ["--engine"]


@pytest.mark.timeout(COMPOSE_TEST_TIMEOUT + 90)
def test_the_services_run_on_a_real_docker_engine():
    """Build, up with two load clients and two netpeers, conform + load + the netpeers' ping
    across containers pass, down, nothing left (the script checks each; see its header). Runs
    wherever an engine runs or can be started (root, dockerd, mmdebstrap: scripts/install-test-
    tools installs them within a time budget); skips, saying why, only where neither holds."""
    args = compose_test_args()
    if isinstance(args, str):
        pytest.skip(args)
    proc = subprocess.Popen(
        [str(COMPOSE_TEST), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=COMPOSE_TEST_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()  # its trap stops the engine and removes what it made
        try:
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        pytest.fail(f"compose-test took more than {COMPOSE_TEST_TIMEOUT} s:\n{out}")
    print(out)
    if proc.returncode == CANNOT_RUN_HERE:
        reason = out.strip().splitlines()[-1].removeprefix("compose-test: ")
        note = engine_install_note()
        pytest.skip(reason + (f"; {note}" if note else ""))
    assert proc.returncode == 0, out
    devices = argv(compose()["services"]["server"]["command"]).count("--device")
    conform = rf"_conform_1: {devices} device\(s\), \d+ checks: .* 0 FAIL"
    assert re.search(conform, out), out
    assert len(re.findall(r"_load_\d+: result +OK", out)) == 2, out
    assert len(re.findall(r"_netpeer_\d+: netpeer: .* 0% packet loss", out)) == 2, out
    assert out.rstrip().endswith("compose-test: OK"), out
