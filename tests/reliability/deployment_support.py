"""The deployment files as data, and Linux network namespaces standing in for their hosts.

`deploy/compose.yaml` (merge keys resolved by PyYAML, `${VAR}` interpolated as compose does)
and `deploy/k8s/*.yaml` are read here; `Hosts` makes one network namespace per host, each
linked to the root namespace by a veth pair of its own /30, with an `/etc/netns/<ns>/hosts`
(bind-mounted over /etc/hosts by `ip netns exec`) that resolves the shared services' names
to the root side of that link, where the test forwards them to the machine's services.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from tests.support.stack import LOG_DIR, ROOT, Process

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))

# --- compose ------------------------------------------------------------------------------

_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


class MissingVariable(KeyError):
    pass


def interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's interpolation: `$$`, `$V`, `${V}`, `${V:-default}`, `${V-default}`, `${V:?}`."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        present = name in variables
        value = variables.get(name, "")
        if (op in (":-", ":?") and not value) or (op in ("-", "?") and not present):
            if op.endswith("?"):
                raise MissingVariable(f"{name}: {arg or 'required by deploy/compose.yaml'}")
            return arg
        return value

    return _VARIABLE.sub(one, value)


def _interpolated(node: Any, variables: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [_interpolated(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: _interpolated(value, variables) for key, value in node.items()}
    return node


def compose_file(variables: Mapping[str, str] | None = None) -> dict[str, Any]:
    """deploy/compose.yaml with merge keys resolved; interpolated when given variables."""
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data if variables is None else _interpolated(data, variables)


def compose_variables_required() -> set[str]:
    """The names the compose file insists on (`${NAME:?}` / `${NAME?}`)."""
    text = COMPOSE.read_text(encoding="utf-8")
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", text))


def k8s_documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in K8S:
        docs += [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    return docs


def image_env() -> dict[str, str]:
    """The `ENV` of deploy/Dockerfile: what every container has before compose adds its own."""
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for item in shlex.split(line[4:]):
                name, _, value = item.partition("=")
                found[name] = value
    return found


def image_workdir() -> str:
    text = DOCKERFILE.read_text(encoding="utf-8")
    return re.findall(r"^WORKDIR\s+(\S+)", text, flags=re.MULTILINE)[-1]


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's `environment:` (mapping or list form) as strings."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def command_of(service: Mapping[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def retarget(url: str, *, userinfo: str, path: str) -> str:
    """`url` with its credentials and path (database, db number, vhost) replaced, host kept."""
    parts = urlsplit(url)
    netloc = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
    if userinfo:
        netloc = f"{userinfo}@{netloc}"
    return urlunsplit((parts.scheme, netloc, path, parts.query, parts.fragment))


def userinfo_of(url: str) -> str:
    netloc = urlsplit(url).netloc
    return netloc.rsplit("@", 1)[0] if "@" in netloc else ""


@dataclass(frozen=True)
class PathMap:
    """Container paths (the image's workdir, volume mounts, secrets) -> this machine's."""

    paths: Mapping[str, Path]

    def __call__(self, value: str) -> str:
        # One pass, longest first: a replacement is never mapped again.
        inside = "|".join(re.escape(p) for p in sorted(self.paths, key=len, reverse=True))
        pattern = rf"(?<![\w./-])(?:{inside})(?=$|[/:])"
        return re.sub(pattern, lambda m: str(self.paths[m.group(0)]), value)


# --- hosts ----------------------------------------------------------------------------------

SUBNET = "10.231"  # 10.231.<n>.0/30 per host; <n> picked among the ones no interface uses
_LOCK = Path(tempfile.gettempdir()) / "mantle-netns.lock"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [shutil.which("ip") or "ip", *args], capture_output=True, text=True, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def netns_problem() -> str:
    """Why network namespaces cannot be made here, or "" when they can."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if shutil.which("unshare") is None:
        return "the `unshare` command (util-linux) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    probe = f"mt{os.getpid()}probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return ""


@dataclass
class Host:
    """One machine: a network namespace and the processes started in it."""

    role: str
    netns: str
    veth: str  # the root namespace's end of its link
    gateway_ip: str  # the root namespace's address on the link (where shared services are)
    ip: str  # the host's own address
    processes: list[Process] = field(default_factory=list)

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run on this host: in its network namespace, under its own host name.

        A UTS namespace per process gives it the host's name, as a container or a machine
        has its own (Celery names its node after it: two workers called `celery@<same>`
        on one RabbitMQ vhost collide on their exclusive pidbox queue). Each step execs
        the next, so the process started is `argv` itself, with the same pid.
        """
        return [
            *(shutil.which("ip") or "ip", "netns", "exec", self.netns),
            *(shutil.which("unshare") or "unshare", "--uts"),
            *("sh", "-c", 'hostname "$0" && exec "$@"', self.role),
            *argv,
        ]

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.netns, check=False).stdout
        return [int(p) for p in out.split()]


@dataclass
class Hosts:
    """Makes hosts and always takes them down again: processes, links, namespaces, files."""

    names: Iterable[str]  # what each host's /etc/hosts resolves to its link's root side
    hosts: list[Host] = field(default_factory=list)

    def add(self, role: str) -> Host:
        netns = f"mt{os.getpid()}{role}"
        assert len(netns) <= 15, netns  # also the root end's interface name
        with _LOCK.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once pick different subnets
            used = {
                int(n)
                for n in re.findall(
                    rf"inet {re.escape(SUBNET)}\.(\d+)\.", _ip("-o", "-4", "addr").stdout
                )
            }
            third = min(set(range(1, 255)) - used)
            host = Host(
                role=role,
                netns=netns,
                veth=netns,
                gateway_ip=f"{SUBNET}.{third}.1",
                ip=f"{SUBNET}.{third}.2",
            )
            self.hosts.append(host)
            _ip("netns", "add", netns)
            _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            _ip("addr", "add", f"{host.gateway_ip}/30", "dev", host.veth)
        _ip("link", "set", host.veth, "up")
        _ip("-n", netns, "addr", "add", f"{host.ip}/30", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        etc = Path("/etc/netns") / netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(
            "127.0.0.1 localhost\n::1 localhost\n"
            f"{host.ip} {role}\n" + "".join(f"{host.gateway_ip} {name}\n" for name in self.names),
            encoding="utf-8",
        )
        return host

    def spawn(
        self, host: Host, name: str, argv: list[str], env: Mapping[str, str], cwd: Path
    ) -> Process:
        """`argv` run on `host` (in its namespace), in a session (process group) of its own."""
        log = LOG_DIR / f"deploy-{name}.log"
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as handle:
            started_at = time.time()
            popen = subprocess.Popen(
                host.command(argv),
                cwd=cwd,
                env=dict(env),
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Process(name=name, popen=popen, log=log, started_at=started_at)
        host.processes.append(proc)
        return proc

    def kill_host(self, host: Host) -> None:
        """SIGKILL every process group started on `host`: the machine is gone, at once."""
        for proc in host.processes:
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
        for proc in host.processes:
            proc.popen.wait(timeout=30)

    def stop_host(self, host: Host) -> None:
        for proc in reversed(host.processes):
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in reversed(host.processes):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        self.kill_host(host)
        # Whatever is still in the namespace was started there by this test.
        for pid in host.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> list[str]:
        """Takes every host down; returns what could not be removed (empty when all was)."""
        left: list[str] = []
        for host in reversed(self.hosts):
            try:
                self.stop_host(host)
            except Exception as exc:  # keep cleaning up the rest
                left.append(f"{host.netns}: processes: {exc}")
            _ip("link", "del", host.veth, check=False)
            _ip("netns", "del", host.netns, check=False)
            shutil.rmtree(Path("/etc/netns") / host.netns, ignore_errors=True)
            if host.netns in _ip("netns", "list", check=False).stdout.split():
                left.append(f"namespace {host.netns}")
            if _ip("link", "show", host.veth, check=False).returncode == 0:
                left.append(f"link {host.veth}")
        self.hosts.clear()
        return left


@contextlib.contextmanager
def rabbitmq_vhost(name: str, user: str) -> Iterator[str]:
    """A RabbitMQ virtual host of the caller's own (its queues shared with no other test)."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        raise RuntimeError(
            "rabbitmqctl is needed to give this test a RabbitMQ vhost of its own "
            "(the broker of deploy/compose.yaml); install rabbitmq-server"
        )

    def run(*args: str) -> None:
        done = subprocess.run(
            [ctl, "-q", *args], capture_output=True, text=True, check=False, timeout=60
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()}")

    run("add_vhost", name)
    try:
        run("set_permissions", "-p", name, user, ".*", ".*", ".*")
        yield name
    finally:
        run("delete_vhost", name)


# --- static checks of the manifests -----------------------------------------------------------

# Read by Python, Django or the image itself rather than by a settings module.
PROCESS_ENV = {
    "DJANGO_SETTINGS_MODULE",
    "PYTHONPATH",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
}
_READS = re.compile(
    r"(?:\benv\.(?:str|int|bool|float|list|db|json|url|path)|os\.environ\.get|os\.getenv"
    r"|os\.environ\.setdefault|\b_int|\b_float|\bsecret)\(\s*[\"']([A-Z][A-Z0-9_]*)[\"']"
    r"|os\.environ\[[\"']([A-Z][A-Z0-9_]*)[\"']\]"
)
_SECRET = re.compile(r"\bsecret\(\s*[\"']([A-Z][A-Z0-9_]*)[\"']")


def env_names_read() -> set[str]:
    """Every environment variable the code reads (settings, worker and compile settings...)."""
    names = set(PROCESS_ENV)
    for top in ("platform", "billing", "workers"):
        for path in (ROOT / top).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            text = path.read_text(encoding="utf-8")
            names |= {a or b for a, b in _READS.findall(text)}
            names |= {f"{n}_FILE" for n in _SECRET.findall(text)}  # core.env.secret
    return names


@dataclass
class Container:
    """A Mantle container of a manifest: where it is, its argv and its environment's names."""

    where: str
    argv: list[str]
    env: dict[str, str]  # literal values; "" for values from elsewhere (fieldRef, secrets)
    env_from: list[tuple[str, str]] = field(default_factory=list)  # (ConfigMap|Secret, name)


_WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}


def _pods(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """(where, pod spec, pod labels) of every workload."""
    found = []
    for doc in docs:
        if doc.get("kind") not in _WORKLOADS:
            continue
        spec = doc["spec"]
        if doc["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        template = spec["template"]
        labels = (template.get("metadata") or {}).get("labels") or {}
        found.append((f"k8s {doc['kind']}/{doc['metadata']['name']}", template["spec"], labels))
    return found


def k8s_containers(docs: list[dict[str, Any]]) -> list[Container]:
    found = []
    for where, pod, _ in _pods(docs):
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            if "mantle" not in str(c.get("image", "")):
                continue  # aws-cli and the like
            env = {e["name"]: str(e.get("value", "")) for e in c.get("env", [])}
            refs = [
                (
                    "ConfigMap" if "configMapRef" in ref else "Secret",
                    next(iter(ref.values()))["name"],
                )
                for ref in c.get("envFrom", [])
            ]
            found.append(
                Container(
                    where=f"{where} container {c['name']}",
                    argv=[str(a) for a in c.get("command", []) + c.get("args", [])],
                    env=env,
                    env_from=refs,
                )
            )
    return found


def k8s_env_sources(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, str]]:
    """(kind, name) -> the keys (and literal values) of each ConfigMap and Secret."""
    sources = {}
    for doc in docs:
        if doc.get("kind") in ("ConfigMap", "Secret"):
            data = {**doc.get("data", {}), **doc.get("stringData", {})}
            sources[(doc["kind"], doc["metadata"]["name"])] = {k: str(v) for k, v in data.items()}
    return sources


def compose_containers(data: dict[str, Any]) -> list[Container]:
    return [
        Container(where=f"compose service {name}", argv=command_of(s), env=environment_of(s))
        for name, s in data["services"].items()
        if "mantle" in str(s.get("image", "")) and "command" in s
    ]


@dataclass(frozen=True)
class EntryPoint:
    """What a command runs: (kind, target, subcommand, queues)."""

    kind: str  # celery | uvicorn | manage.py
    target: str  # the Celery app module, the ASGI app, or the management command
    sub: str = ""
    queues: tuple[str, ...] = ()


def _options(command: Any, tokens: list[str], *, stop_at_positional: bool) -> tuple:
    """Splits `tokens` by a click command's options: (values, positionals, unknown options)."""
    import click

    by_flag = {
        flag: p
        for p in command.params
        if isinstance(p, click.Option)
        for flag in (*p.opts, *p.secondary_opts)
    }
    values: dict[str, Any] = {}
    positionals: list[str] = []
    unknown: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("-") and len(token) > 1:
            flag, eq, value = token.partition("=")
            param = by_flag.get(flag)
            if param is None:
                unknown.append(flag)
            elif param.is_flag or param.count:
                values[param.name] = True
            elif eq:
                values[param.name] = value
            else:
                i += 1
                values[param.name] = tokens[i] if i < len(tokens) else ""
        else:
            positionals.append(token)
            if stop_at_positional:
                return values, positionals + tokens[i + 1 :], unknown
        i += 1
    return values, positionals, unknown


def _argv_proper(container: Container, env_names: set[str]) -> tuple[list[str], list[str]]:
    """The argv a container's process really gets: `sh -c "exec ..."` unwrapped, and k8s's
    `$(NAME)` expansions checked (they must name the container's own variables)."""
    argv, problems = list(container.argv), []
    if argv[:2] == ["sh", "-c"] and len(argv) >= 3:
        script = argv[2]
        for name in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", script):
            if name not in env_names:
                problems.append(f"{container.where}: $({name}) is not one of its variables")
        argv = shlex.split(re.sub(r"\$\([A-Za-z_][A-Za-z0-9_]*\)", "x", script))
        argv = argv[1:] if argv[:1] == ["exec"] else argv
    return argv, problems


def entry_point_problems(
    container: Container, env: Mapping[str, str]
) -> tuple[EntryPoint | None, list[str]]:
    """Checks that a command names an entry point that exists, with options it knows."""
    import importlib

    import uvicorn
    from celery import Celery
    from celery.bin.celery import celery as celery_cli
    from django.conf import settings
    from django.core.management import CommandError, get_commands, load_command_class

    from workers.contract import inference_queue

    where = container.where
    argv, problems = _argv_proper(container, set(env))
    if argv[:1] != ["python"]:
        return None, [*problems, f"{where}: runs {argv[:1]}, not the image's python"]
    if argv[1:3] == ["-m", "celery"]:
        group, rest, unknown = _options(celery_cli, argv[3:], stop_at_positional=True)
        app_name = str(group.get("app", ""))
        sub = rest[0] if rest else ""
        problems += [f"{where}: unknown celery option {u}" for u in unknown]
        try:
            module = importlib.import_module(app_name)
        except ImportError as exc:
            return None, [*problems, f"{where}: celery app {app_name!r}: {exc}"]
        if not isinstance(getattr(module, "app", None), Celery):
            problems.append(f"{where}: {app_name} has no Celery `app`")
        if sub not in celery_cli.commands:
            return None, [*problems, f"{where}: no celery subcommand {sub!r}"]
        values, _, unknown = _options(celery_cli.commands[sub], rest[1:], stop_at_positional=False)
        problems += [f"{where}: unknown `celery {sub}` option {u}" for u in unknown]
        queues = tuple(q for q in str(values.get("queues", "")).split(",") if q)
        if sub == "worker" and app_name == "workers.celery_app":
            pool = env.get("MANTLE_POOL", "")
            if queues != (inference_queue(pool),):
                problems.append(f"{where}: -Q {','.join(queues)} but MANTLE_POOL={pool!r}")
            if str(values.get("concurrency", "")) != env.get("MANTLE_CONCURRENCY"):
                problems.append(
                    f"{where}: -c {values.get('concurrency')} but "
                    f"MANTLE_CONCURRENCY={env.get('MANTLE_CONCURRENCY')!r} (heartbeat slots)"
                )
        if sub == "worker" and app_name == "config.celery":
            schedule: dict[str, dict[str, Any]] = settings.CELERY_BEAT_SCHEDULE
            default = str(settings.CELERY_TASK_DEFAULT_QUEUE)
            sent = {default} | {
                str(entry.get("options", {}).get("queue", default)) for entry in schedule.values()
            }
            if set(queues) != sent:
                problems.append(
                    f"{where}: consumes {sorted(queues)}, the control plane sends to {sorted(sent)}"
                )
        return EntryPoint("celery", app_name, sub, queues), problems
    if argv[1:3] == ["-m", "uvicorn"]:
        _, positionals, unknown = _options(uvicorn.main, argv[3:], stop_at_positional=False)
        problems += [f"{where}: unknown uvicorn option {u}" for u in unknown]
        app_path = positionals[0] if positionals else ""
        module_name, _, attr = app_path.partition(":")
        try:
            if not callable(getattr(importlib.import_module(module_name), attr, None)):
                problems.append(f"{where}: {app_path} is not an ASGI application")
        except ImportError as exc:
            problems.append(f"{where}: {app_path}: {exc}")
        return EntryPoint("uvicorn", app_path), problems
    if argv[1:2] == ["manage.py"] and len(argv) > 2:
        name, args = argv[2], argv[3:]
        app = get_commands().get(name)
        if app is None:
            return None, [*problems, f"{where}: no management command {name!r}"]
        try:
            load_command_class(app, name).create_parser("manage.py", name).parse_args(args)
        except (CommandError, SystemExit) as exc:
            problems.append(f"{where}: manage.py {name} {' '.join(args)}: {exc}")
        return EntryPoint("manage.py", name), problems
    return None, [*problems, f"{where}: {argv} is no known entry point"]


def container_env(
    container: Container, sources: Mapping[tuple[str, str], dict[str, str]]
) -> tuple[dict[str, str], list[str]]:
    env: dict[str, str] = {}
    problems = []
    for ref in container.env_from:
        if ref not in sources:
            problems.append(f"{container.where}: envFrom {ref[0]} {ref[1]!r} does not exist")
        env.update(sources.get(ref, {}))
    env.update(container.env)
    return env, problems


def manifest_problems(
    containers: list[Container], sources: Mapping[tuple[str, str], dict[str, str]]
) -> tuple[dict[EntryPoint, list[str]], list[str]]:
    """Entry points and variable names of every container; returns (entry points, problems)."""
    read = env_names_read()
    problems: list[str] = []
    entry_points: dict[EntryPoint, list[str]] = {}
    for (kind, name), data in sources.items():
        problems += [
            f"{kind} {name}: {var} is read by no setting" for var in data if var not in read
        ]
    for container in containers:
        env, missing = container_env(container, sources)
        problems += missing
        argv_vars = set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(container.argv)))
        problems += [
            f"{container.where}: {var} is read by no setting"
            for var in container.env
            if var not in read and var not in argv_vars
        ]
        entry, found = entry_point_problems(container, env)
        problems += found
        if entry is not None:
            entry_points.setdefault(entry, []).append(container.where)
    return entry_points, problems


# --- who holds which secret, who reaches what ---------------------------------------------------

REDIS_ACL = DEPLOY / "redis" / "users.acl"

# Secrets (and credentials) that processes running tenant-uploaded graphs must never hold.
WORKER_FORBIDDEN = {
    "DATABASE_URL",
    "DJANGO_SECRET_KEY",
    "MANTLE_API_KEY_PEPPER",
    "MANTLE_IDENTITY_KEY",
    "STRIPE_API_KEY",
    "STRIPE_WEBHOOK_SECRET",
}
# The Redis ACL user of each role (deploy/redis/users.acl).
REDIS_USER_OF_ROLE = {"gateway": "gateway", "control": "control", "drain": "drain"}
WORKER_APPS = ("workers.celery_app", "workers.compile.celery_app")


def redis_acl_rules() -> dict[str, list[str]]:
    """deploy/redis/users.acl: user -> its rules, a selector `(...)` kept as one rule."""
    users: dict[str, list[str]] = {}
    for line in REDIS_ACL.read_text(encoding="utf-8").splitlines():
        if not line.startswith("user "):
            continue
        _, name, rest = line.split(" ", 2)
        users[name] = re.findall(r"\([^)]*\)|\S+", rest)
    return users


@contextlib.contextmanager
def redis_acl_users(url: str, suffix: str) -> Iterator[dict[str, tuple[str, str]]]:
    """The users of deploy/redis/users.acl created on the Redis at `url` (as `<user><suffix>`,
    each with a random password), deleted afterwards: user -> (name, password).

    Only the users with passwords: `default` (which the test suite itself uses) is left as is.
    """
    import secrets as random_secrets

    import redis as redis_lib

    client = redis_lib.Redis.from_url(url)
    made: dict[str, tuple[str, str]] = {}
    try:
        for user, rules in redis_acl_rules().items():
            if "nopass" in rules or "off" in rules:
                continue
            name, password = f"{user}{suffix}", random_secrets.token_hex(16)
            client.execute_command("ACL", "SETUSER", name, "reset", f">{password}", *rules)
            made[user] = (name, password)
        yield made
    finally:
        for name, _ in made.values():
            client.execute_command("ACL", "DELUSER", name)
        client.close()


def _url_user(url: str) -> str:
    return urlsplit(url).username or ""


def _role_of(container: Container, env: Mapping[str, str]) -> str:
    """`worker` for the Celery apps of worker nodes, else the container's MANTLE_ROLE."""
    argv = " ".join(container.argv)
    if any(f"-A {app} " in f"{argv} " for app in WORKER_APPS):
        return "worker"
    return env.get("MANTLE_ROLE", "")


def secret_problems(containers: list[Container], sources: Any) -> list[str]:
    """Each container holds exactly its role's secrets (core/secret_checks.py); workers
    hold none of WORKER_FORBIDDEN; each Redis URL names its role's ACL user."""
    from core.secret_checks import ROLE_SECRETS, SECRETS

    acl_users = set(redis_acl_rules())
    problems = []
    for container in containers:
        env, _ = container_env(container, sources)
        names = {n.removesuffix("_FILE") for n in env}
        role = _role_of(container, env)
        where = container.where
        if role == "worker":
            problems += [f"{where}: a worker holds {n}" for n in sorted(names & WORKER_FORBIDDEN)]
            expected_user = "worker"
        elif role not in ROLE_SECRETS or role == "all":
            problems.append(f"{where}: MANTLE_ROLE={role!r} is not a deployment role")
            continue
        else:
            held = names & set(SECRETS)
            if held != set(ROLE_SECRETS[role]):
                problems.append(
                    f"{where}: role {role} holds {sorted(held)}, needs {sorted(ROLE_SECRETS[role])}"
                )
            expected_user = REDIS_USER_OF_ROLE.get(role, "")
        if "REDIS_URL" in env:
            user = _url_user(env["REDIS_URL"])
            if user not in acl_users or user != expected_user:
                problems.append(f"{where}: Redis user {user!r}, expected {expected_user!r}")
        elif expected_user:
            problems.append(f"{where}: no REDIS_URL for Redis user {expected_user!r}")
    return problems


def hardening_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Every pod: no service-account token, non-root, RuntimeDefault seccomp; every
    container: no privilege escalation, read-only root, all capabilities dropped, and a
    writable /tmp (an emptyDir) since the root is read-only."""
    problems = []
    for where, pod, _ in _pods(docs):
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken is not false")
        context = pod.get("securityContext") or {}
        if context.get("runAsNonRoot") is not True or not context.get("runAsUser"):
            problems.append(f"{where}: not runAsNonRoot with a numeric runAsUser")
        if (context.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: seccompProfile is not RuntimeDefault")
        empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            name = f"{where} container {c['name']}"
            sc = c.get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{name}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{name}: readOnlyRootFilesystem is not true")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{name}: capabilities do not drop ALL")
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if mounts.get("/tmp") not in empty_dirs:
                problems.append(f"{name}: no emptyDir at /tmp on a read-only root")
    return problems


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    wanted = selector.get("matchLabels") or {}
    return all(labels.get(k) == v for k, v in wanted.items())


@dataclass(frozen=True)
class Reach:
    """What the NetworkPolicies let one workload's pods do."""

    egress: frozenset[tuple[int, str]]  # (port, cidr or "pods")
    ingress_ports: frozenset[int]
    isolated: bool  # a policy of both types selects it (default deny applies)


def network_reach(docs: list[dict[str, Any]]) -> dict[str, Reach]:
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    reach = {}
    for where, _, labels in _pods(docs):
        egress: set[tuple[int, str]] = set()
        ingress: set[int] = set()
        types: set[str] = set()
        for policy in policies:
            spec = policy["spec"]
            if not _selects(spec.get("podSelector") or {}, labels):
                continue
            types |= set(spec.get("policyTypes") or [])
            for rule in spec.get("egress", []):
                targets = [
                    (t.get("ipBlock") or {}).get("cidr", "pods") for t in rule.get("to", [])
                ] or ["anywhere"]
                for port in rule.get("ports", []) or [{"port": 0}]:
                    egress |= {(int(port["port"]), t) for t in targets}
            for rule in spec.get("ingress", []):
                ingress |= {int(p["port"]) for p in rule.get("ports", []) or [{"port": 0}]}
        reach[where] = Reach(
            egress=frozenset(egress),
            ingress_ports=frozenset(ingress),
            isolated={"Ingress", "Egress"} <= types,
        )
    return reach


# The port each credential is for: a pod may reach a service only if it holds its URL.
SERVICE_PORTS = {"DATABASE_URL": 5432, "REDIS_URL": 6379, "CELERY_BROKER_URL": 5672}
DNS_PORT = 53
INTERNET = "0.0.0.0/0"


def network_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Default deny for every pod; each pod's egress is exactly what its credentials are
    for (PostgreSQL, Redis, the broker), DNS, the artifact store for pods that sync it, and
    the internet (Stripe, mail) only for holders of the Stripe key; ingress only where a
    port is served (the gateway's HTTP, the drain's metrics)."""
    sources = k8s_env_sources(docs)
    containers = {c.where.rsplit(" container ", 1)[0]: c for c in k8s_containers(docs)}
    problems = []
    # One policy isolating every pod of the namespace, so a workload added later without a
    # policy of its own is denied rather than open.
    if not any(
        d.get("kind") == "NetworkPolicy"
        and not (d["spec"].get("podSelector") or {}).get("matchLabels")
        and {"Ingress", "Egress"} <= set(d["spec"].get("policyTypes") or [])
        and not d["spec"].get("ingress")
        and not d["spec"].get("egress")
        for d in docs
    ):
        problems.append("no default-deny NetworkPolicy (podSelector {}, Ingress and Egress)")
    for (where, pod, _), reach in zip(_pods(docs), network_reach(docs).values(), strict=True):
        if not reach.isolated:
            problems.append(f"{where}: no default-deny policy selects it")
        env: dict[str, str] = {}
        if where in containers:
            env, _ = container_env(containers[where], sources)
        ports = {DNS_PORT} | {port for var, port in SERVICE_PORTS.items() if var in env}
        if "STRIPE_API_KEY" in env:
            ports |= {443, 587}
        syncs = any(
            "s3" in " ".join(map(str, c.get("command", []))) for c in pod.get("initContainers", [])
        )
        if syncs:
            ports.add(443)
        allowed = {port for port, _ in reach.egress}
        if allowed != ports:
            problems.append(f"{where}: egress ports {sorted(allowed)}, needs {sorted(ports)}")
        if "STRIPE_API_KEY" not in env and any(c == INTERNET for _, c in reach.egress):
            problems.append(f"{where}: reaches the internet without needing it")
        served = {
            int(p["containerPort"]) for c in pod.get("containers", []) for p in c.get("ports", [])
        }
        if where in containers:  # the drain's metrics port is an option, not a containerPort
            argv = " ".join(containers[where].argv)
            served |= {int(n) for n in re.findall(r"--metrics-port[ =](\d+)", argv)}
        if not reach.ingress_ports <= served:
            problems.append(
                f"{where}: ingress to {sorted(reach.ingress_ports)}, serves {sorted(served)}"
            )
    return problems


def compose_network_problems(data: dict[str, Any]) -> list[str]:
    """Compose: a shared service's networks are joined only by services holding its URL."""
    owners = {"postgres": "DATABASE_URL", "redis": "REDIS_URL", "rabbitmq": "CELERY_BROKER_URL"}
    services = data["services"]
    problems = []
    for shared, var in owners.items():
        for net in services[shared].get("networks", []):
            if not data.get("networks", {}).get(net, {}).get("internal"):
                problems.append(f"compose network {net} of {shared} is not internal")
            for name, service in services.items():
                if name == shared or net not in service.get("networks", []):
                    continue
                if var not in environment_of(service):
                    problems.append(f"compose service {name} joins {net} without {var}")
    for name, service in services.items():
        if not service.get("networks"):
            problems.append(f"compose service {name} is on the default network")
    return problems
