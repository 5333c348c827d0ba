"""The deployment files, run: deploy/compose.yaml's services across hosts, and k8s checked.

No container engine runs on the test machines, so the end-to-end test runs what the compose
file says each app service runs (its command and environment, over the image's `ENV`) as
real processes, each host a Linux network namespace of its own: two gateway hosts, one
inference node, one control host. The shared services' names (postgres, redis, rabbitmq)
resolve on every host to the far end of its own link, where this test forwards them to the
machine's PostgreSQL, Redis and RabbitMQ; only credentials, database names, db numbers and
the vhost are the test's own. The fast tests cross-check deploy/k8s/*.yaml against the code
and against compose, so that a typo in a manifest fails the suite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
import redis
import yaml
from django.conf import settings
from django.db import connection
from openai import APIConnectionError, OpenAI

from tests.reliability.conftest import Tenant, tenant_on
from tests.reliability.deployment_support import (
    Container,
    EntryPoint,
    Host,
    Hosts,
    PathMap,
    command_of,
    compose_containers,
    compose_file,
    compose_network_problems,
    container_env,
    environment_of,
    hardening_problems,
    image_env,
    image_workdir,
    k8s_containers,
    k8s_documents,
    k8s_env_sources,
    manifest_problems,
    netns_problem,
    network_problems,
    network_reach,
    rabbitmq_vhost,
    redis_acl_users,
    retarget,
    secret_problems,
    userinfo_of,
)
from tests.reliability.support import TcpProxy, wait_until
from tests.support import stack
from tests.support.stack import ROOT, Process, builtin_manifests
from workers.contract import inference_queue, pool_live_key, worker_info_key

EMBED = "all-minilm-l6-v2"
HOSTNAME = "api.mantle.test"  # MANTLE_HOSTNAME: what the load balancer is reached by
# What the compose file requires (`${NAME:?}`): credentials are rewritten to the test's own.
VARIABLES = {
    "MANTLE_HOSTNAME": HOSTNAME,
    "POSTGRES_PASSWORD": "unused-rewritten",
    "RABBITMQ_PASSWORD": "unused-rewritten",
    "MINIO_PASSWORD": "unused-rewritten",
    "REDIS_GATEWAY_PASSWORD": "unused-rewritten",
    "REDIS_CONTROL_PASSWORD": "unused-rewritten",
    "REDIS_DRAIN_PASSWORD": "unused-rewritten",
    "REDIS_WORKER_PASSWORD": "unused-rewritten",
}
# The shared services every app host reaches by name, on their standard ports.
SHARED = {"postgres": 5432, "redis": 6379, "rabbitmq": 5672}
AMQP = os.environ.get("MANTLE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
POOL = "cpu"  # worker-cpu-local's MANTLE_POOL (checked against the file below)


# --- the compose file, made runnable here -------------------------------------------------


@dataclass
class Rendered:
    """A compose service as a process on this machine: argv and the whole environment."""

    name: str
    argv: list[str]
    env: dict[str, str]
    service: dict[str, Any]


@dataclass
class Compose:
    data: dict[str, Any]
    paths: PathMap
    urls: Mapping[str, Callable[[str], str]]  # env name -> rewrite of its URL
    home: Path

    def render(self, name: str) -> Rendered:
        service = self.data["services"][name]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "LANG": "C.UTF-8",
        }
        env.update({k: self.paths(v) for k, v in image_env().items()})
        env.update({k: self.paths(v) for k, v in environment_of(service).items()})
        for var, rewrite in self.urls.items():
            if var in env:
                env[var] = rewrite(env[var])
        for var, value in env.items():
            host = urlsplit(value).hostname if "://" in value else None
            assert host not in SHARED or var in self.urls, f"{var}={value} is not rewritten"
        argv = [self.paths(a) for a in command_of(service)]
        assert argv[0] == "python", argv  # the image's interpreter: ours, the venv's
        return Rendered(name=name, argv=[sys.executable, *argv[1:]], env=env, service=service)


def _compose(
    tmp: Path, redis_url: str, broker_url: str, redis_users: Mapping[str, tuple[str, str]]
) -> Compose:
    """The compose file rewritten to this machine: each role's Redis URL names the test's
    copy of its ACL user (`redis_users`: user -> (name, password))."""
    data = compose_file(VARIABLES)
    secrets_dir = tmp / "secrets"
    secrets_dir.mkdir()
    # The values this test process runs with (config.settings.test's defaults), so keys
    # it makes validate on the gateways: the pepper above all.
    values = {
        "django_secret_key": str(settings.SECRET_KEY),
        "api_key_pepper": str(settings.API_KEY_PEPPER),
        "identity_key": str(settings.MANTLE_IDENTITY_KEY),
    }
    for name in data["secrets"]:
        (secrets_dir / name).write_text(values[name] + "\n", encoding="utf-8")
    volumes = {"artifacts": Path(settings.MANTLE_ARTIFACT_DIR)}
    paths: dict[str, Path] = {image_workdir(): ROOT, "/tmp": tmp / "tmp"}
    (tmp / "tmp").mkdir()
    for service in data["services"].values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source in volumes:
                paths[target] = volumes[source]
        for name in service.get("secrets", []):
            paths[f"/run/secrets/{name}"] = secrets_dir / name
    db = connection.settings_dict
    db_userinfo = userinfo_of(stack.database_url())
    return Compose(
        data=data,
        paths=PathMap(paths),
        urls={
            "DATABASE_URL": lambda u: retarget(u, userinfo=db_userinfo, path=f"/{db['NAME']}"),
            "REDIS_URL": lambda u: retarget(
                u,
                userinfo=":".join(redis_users[urlsplit(u).username or ""]),
                path=urlsplit(redis_url).path,
            ),
            "CELERY_BROKER_URL": lambda u: retarget(
                u, userinfo=userinfo_of(broker_url), path=urlsplit(broker_url).path
            ),
        },
        home=tmp,
    )


# --- a load balancer, as the client sees it ---------------------------------------------------


def _refused(exc: BaseException) -> bool:
    """The connection could not be made (so the request was never sent)."""
    seen: BaseException | None = exc
    while seen is not None:
        # httpx's ConnectError, or that of httpx2 (what this openai release uses)
        if isinstance(seen, ConnectionRefusedError) or type(seen).__name__ == "ConnectError":
            return True
        seen = seen.__cause__
    return False


@dataclass
class RoundRobin:
    """Clients of the gateway hosts in turn, as the load balancer would spread them.

    Sends what the compose file's load balancer (caddy reverse-proxy) sends: the public
    host name in `Host` and `X-Forwarded-Proto: https`. A gateway that refuses the
    connection (nothing was sent) is taken out of the rotation and the request goes to
    the next one, as a load balancer's passive health check does.
    """

    secret: str
    hosts: list[Host]
    down: set[str] = field(default_factory=set)
    served: dict[str, int] = field(default_factory=dict)
    _turn: int = 0
    _clients: dict[str, OpenAI] = field(default_factory=dict)

    def client(self, host: Host) -> OpenAI:
        if host.role not in self._clients:
            self._clients[host.role] = OpenAI(
                base_url=f"http://{host.ip}:8000/v1",
                api_key=self.secret,
                max_retries=0,
                timeout=120,
                default_headers={"Host": HOSTNAME, "X-Forwarded-Proto": "https"},
            )
        return self._clients[host.role]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()

    def __call__(self, request: Callable[[OpenAI], Any]) -> Any:
        for _ in range(len(self.hosts)):
            host = self.hosts[self._turn % len(self.hosts)]
            self._turn += 1
            if host.role in self.down:
                continue
            try:
                result = request(self.client(host))
            except APIConnectionError as exc:
                if not _refused(exc):
                    raise
                self.down.add(host.role)
                continue
            self.served[host.role] = self.served.get(host.role, 0) + 1
            return result
        raise AssertionError(f"no gateway left: {self.down}")


@dataclass
class Told:
    """What the clients were told each request used: request id -> (input, output)."""

    usage: dict[str, tuple[int, int]] = field(default_factory=dict)

    def chat(self, client: OpenAI, model: str) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12,
            temperature=0,
        )
        done = raw.parse()
        assert done.usage is not None
        self.usage[raw.headers["x-request-id"]] = (
            done.usage.prompt_tokens,
            done.usage.completion_tokens,
        )
        return done.choices[0].message.content or ""

    def stream(self, client: OpenAI, model: str) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": "Name three colours."}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(raw.parse())
        usage = chunks[-1].usage
        assert usage is not None, chunks[-1]
        self.usage[raw.headers["x-request-id"]] = (usage.prompt_tokens, usage.completion_tokens)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    def embed(self, client: OpenAI) -> int:
        raw = client.embeddings.with_raw_response.create(
            model=EMBED, input=["the lighthouse", "the sea"]
        )
        done = raw.parse()
        assert [len(d.embedding) > 0 for d in done.data] == [True, True]
        self.usage[raw.headers["x-request-id"]] = (done.usage.prompt_tokens, 0)
        return len(done.data)

    def all_three(self, lb: RoundRobin, model: str) -> None:
        assert lb(lambda c: self.chat(c, model)).strip()
        assert lb(lambda c: self.stream(c, model)).strip()
        assert lb(self.embed) == 2


# --- waits, each bounded and on the event awaited ---------------------------------------


def _get(url: str, timeout: float = 5) -> httpx.Response:
    return httpx.get(url, headers={"Host": HOSTNAME}, timeout=timeout)


def await_http(proc: Process, url: str, timeout: float) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited:\n{proc.tail()}")
        try:
            response = _get(url)
            if response.status_code == 200:
                return response
            last = f"{response.status_code} {response.text[:300]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.25)
    raise AssertionError(f"{url} not ready in {timeout} s ({last}):\n{proc.tail()}")


def await_worker(proc: Process, client: redis.Redis, timeout: float) -> str:
    """The node name the worker registered under (compose sets no MANTLE_NODE: host-pid)."""
    suffix = f"-{proc.popen.pid}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited:\n{proc.tail()}")
        for node in map(str, client.zrange(pool_live_key(POOL), 0, -1)):
            if node.endswith(suffix) and client.exists(worker_info_key(node)):
                return node
        time.sleep(0.25)
    raise AssertionError(f"{proc.name} did not register a heartbeat:\n{proc.tail()}")


PROBE = """
import socket, sys
for target in sys.argv[1:]:
    name, port = target.rsplit(":", 1)
    try:
        socket.create_connection((name, int(port)), timeout=3).close()
        print("open")
    except OSError:
        print("closed")
"""


# What a compromised worker would try with its Redis credentials: plant a key identity for a
# made-up digest, read one, read the other tenants' usage.
PLANT = """
import os, sys, redis
client = redis.Redis.from_url(os.environ["REDIS_URL"])
for attempt in (
    lambda: client.set(sys.argv[1], "{}"),
    lambda: client.get(sys.argv[1]),
    lambda: client.xrange("mantle:usage", count=1),
):
    try:
        attempt()
        print("allowed")
    except redis.exceptions.NoPermissionError:
        print("refused")
"""


def run_in(host: Host, rendered: Rendered, argv: list[str], timeout: float) -> str:
    """A one-off command on `host` with a service's environment (migrate, a healthcheck)."""
    done = subprocess.run(
        host.command(argv),
        cwd=ROOT,
        env=rendered.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{argv} on {host.role}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


# --- the deployment -----------------------------------------------------------------------


@dataclass
class Deployment:
    compose: Compose
    hosts: Hosts
    gateways: list[Host]
    node: Host
    control: Host
    processes: dict[str, Process]
    worker_node: str
    tmp: Path
    closing: list[Callable[[], None]] = field(default_factory=list)


@pytest.fixture
def deployment(transactional_db: None) -> Iterator[Deployment]:
    problem = netns_problem()
    if problem:
        pytest.fail(
            "tests/reliability/test_deployment.py runs deploy/compose.yaml across network "
            f"namespaces and needs root with iproute2's `ip netns`: {problem}",
            pytrace=False,
        )
    builtin_manifests()  # fails clearly when the models are not prepared
    tmp = Path(tempfile.mkdtemp(prefix="mantle-deploy-"))
    amqp = urlsplit(AMQP)
    hosts = Hosts(names=SHARED)
    proxies: list[TcpProxy] = []
    left: list[str] = []
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, tmp, ignore_errors=True)
        vhost = cleanup.enter_context(
            rabbitmq_vhost(f"mantle-deploy-{os.getpid()}", amqp.username or "guest")
        )
        broker_url = retarget(AMQP, userinfo=userinfo_of(AMQP), path="/" + quote(vhost, safe=""))
        # Each role reaches Redis as its own ACL user (deploy/redis/users.acl), created on
        # the test's Redis for this run.
        redis_users = cleanup.enter_context(
            redis_acl_users(settings.REDIS_URL, suffix=f"-mt{os.getpid()}")
        )
        compose = _compose(tmp, settings.REDIS_URL, broker_url, redis_users)
        db = connection.settings_dict
        redis_parts = urlsplit(settings.REDIS_URL)
        targets = {
            "postgres": (db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432)),
            "redis": (redis_parts.hostname or "127.0.0.1", redis_parts.port or 6379),
            "rabbitmq": (amqp.hostname or "127.0.0.1", amqp.port or 5672),
        }

        def close_network() -> None:
            left.extend(hosts.close())
            for proxy in proxies:
                proxy.close()

        cleanup.callback(close_network)
        made = {role: hosts.add(role) for role in ("gw1", "gw2", "node1", "ctl")}
        for host in made.values():
            for name, port in SHARED.items():
                target_host, target_port = targets[name]
                proxies.append(
                    TcpProxy(
                        target_port, target_host, listen_host=host.gateway_ip, listen_port=port
                    )
                )
        ctl, node = made["ctl"], made["node1"]
        gateways = [made["gw1"], made["gw2"]]

        # depends_on: migrate completes before anything else starts.
        migrate = compose.render("migrate")
        run_in(ctl, migrate, migrate.argv, timeout=180)

        processes: dict[str, Process] = {}

        def start(host: Host, service: str, name: str) -> Process:
            rendered = compose.render(service)
            processes[name] = hosts.spawn(host, name, rendered.argv, rendered.env, cwd=ROOT)
            return processes[name]

        worker = start(node, "worker-cpu-local", "worker-cpu-local")
        for i, host in enumerate(gateways, 1):
            start(host, "gateway", f"gateway-{i}")
        for service in ("control-worker", "drain", "beat"):
            start(ctl, service, service)
        client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
        worker_node = await_worker(worker, client, timeout=150)
        for i, host in enumerate(gateways, 1):
            await_http(processes[f"gateway-{i}"], f"http://{host.ip}:8000/healthz", 120)
        await_http(processes["drain"], f"http://{ctl.ip}:9101/metrics", 60)
        deployed = Deployment(
            compose=compose,
            hosts=hosts,
            gateways=gateways,
            node=node,
            control=ctl,
            processes=processes,
            worker_node=worker_node,
            tmp=tmp,
        )
        yield deployed
        for close in deployed.closing:
            close()
    assert not left, f"left behind: {left}"


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(300)
@pytest.mark.models
@pytest.mark.rabbitmq
def test_compose_topology_across_hosts(deployment: Deployment) -> None:
    from accounts import keys
    from accounts.models import ApiKey
    from billing.models import UsageEvent, UsageRollup

    d = deployment
    worker_cpu = d.compose.data["services"]["worker-cpu-local"]
    assert environment_of(worker_cpu)["MANTLE_POOL"] == POOL
    assert inference_queue(POOL) in command_of(worker_cpu)

    # Readiness on each gateway host with nothing down, and the compose healthcheck as
    # written, run on the gateway host itself.
    gateway = d.compose.render("gateway")
    check = [str(a) for a in gateway.service["healthcheck"]["test"]]
    assert check[0] == "CMD", check
    for host in d.gateways:
        ready = _get(f"http://{host.ip}:8000/readyz").json()
        assert (ready["status"], ready["down"]) == ("ok", []), ready
        run_in(host, gateway, [sys.executable, *check[2:]], timeout=30)

    # The hosts reach the shared services by their names only: nothing listens on a host's
    # own loopback, and each host's name (Celery's node) is its own.
    probe = [f"{name}:{port}" for name, port in SHARED.items()]
    probe += [f"127.0.0.1:{port}" for port in SHARED.values()]
    for host in [*d.gateways, d.node, d.control]:
        reached = run_in(host, gateway, [sys.executable, "-c", PROBE, *probe], timeout=30)
        assert reached.split() == ["open"] * 3 + ["closed"] * 3, (host.role, probe, reached)
    assert d.worker_node.startswith(f"{d.node.role}-"), d.worker_node

    # The inference node's credentials (Redis user `worker`) serve requests (below) but
    # cannot plant or read a key identity, nor read the usage stream.
    worker = d.compose.render("worker-cpu-local")
    forged_at = keys.cache_key(os.urandom(32).hex())  # a digest no test has used
    tried = run_in(d.node, worker, [sys.executable, "-c", PLANT, forged_at], timeout=30)
    assert tried.split() == ["refused"] * 3, tried
    assert not redis.Redis.from_url(settings.REDIS_URL).exists(forged_at)

    tenant: Tenant = tenant_on(POOL, builtin_manifests())
    lb = RoundRobin(tenant.secret, d.gateways)
    d.closing.append(lb.close)
    told = Told()
    for _ in range(2):  # every gateway serves each kind of request
        told.all_three(lb, tenant.chat.id)
    assert lb.served == {"gw1": 3, "gw2": 3}, lb.served
    assert "Paris" in lb(lambda c: told.chat(c, tenant.chat.id))

    # One gateway host dies (all of its processes, at once); nothing else is touched.
    doomed, survivor = d.gateways
    d.hosts.kill_host(doomed)
    assert wait_until(lambda: not doomed.pids(), 10), doomed.pids()
    with pytest.raises(APIConnectionError):
        lb.client(doomed).models.list()
    for _ in range(2):
        told.all_three(lb, tenant.chat.id)
    assert lb.down == {"gw1"}
    ready = _get(f"http://{survivor.ip}:8000/readyz").json()
    assert (ready["status"], ready["down"]) == ("ok", []), ready

    # The drain on the control host bills exactly what the clients were told.
    def billed() -> dict[str, tuple[int, int]]:
        rows = UsageEvent.objects.filter(organization_id=tenant.org.id)
        return {
            r: (i, o) for r, i, o in rows.values_list("request_id", "input_tokens", "output_tokens")
        }

    assert wait_until(lambda: billed() == told.usage, 90, interval=0.5), (billed(), told.usage)
    rollups = UsageRollup.objects.filter(organization_id=tenant.org.id)
    assert sum(r.requests for r in rollups) == len(told.usage)
    assert sum(r.input_tokens for r in rollups) == sum(i for i, _ in told.usage.values())
    assert sum(r.output_tokens for r in rollups) == sum(o for _, o in told.usage.values())
    workers = set(
        UsageEvent.objects.filter(organization_id=tenant.org.id).values_list("worker", flat=True)
    )
    assert workers == {d.worker_node}

    # Beat (control host) schedules the key-usage flush every 30 s; the control worker runs
    # it against the database: the key's last use arrives there.
    assert wait_until(
        lambda: ApiKey.objects.get(pk=tenant.key.pk).last_used_at is not None, 120, interval=1
    ), d.processes["beat"].tail()
    # beat keeps its schedule where the compose file says (a writable path, not /app).
    assert list((d.tmp / "tmp").glob("celerybeat-schedule*")), d.processes["beat"].tail()
    assert not list(ROOT.glob("celerybeat-schedule*"))

    dead = {"gateway-1"}
    for name, proc in d.processes.items():
        assert proc.alive() == (name not in dead), (name, proc.tail())


# --- the manifests, checked without running anything -----------------------------------------


def _compose_containers() -> list[Container]:
    return compose_containers(compose_file(VARIABLES))


def _k8s_problems(docs: list[dict[str, Any]]) -> tuple[dict[EntryPoint, list[str]], list[str]]:
    entry_points, problems = manifest_problems(k8s_containers(docs), k8s_env_sources(docs))
    return entry_points, problems + autoscaling_problems(docs)


def test_k8s_commands_and_variables_name_what_exists() -> None:
    """Every k8s container runs an entry point that exists (a Celery app that imports, a
    management command with options it accepts, an ASGI app), worker queues are
    inference.<MANTLE_POOL>, and every variable set is one the code reads."""
    entry_points, problems = _k8s_problems(k8s_documents())
    assert problems == []
    kinds = {(e.kind, e.target, e.sub) for e in entry_points}
    assert kinds >= {
        ("uvicorn", "config.asgi:application", ""),
        ("celery", "workers.celery_app", "worker"),
        ("celery", "config.celery", "worker"),
        ("celery", "config.celery", "beat"),
        ("manage.py", "drain_usage", ""),
        ("manage.py", "migrate", ""),
    }


def test_compose_commands_and_variables_name_what_exists() -> None:
    entry_points, problems = manifest_problems(_compose_containers(), {})
    assert problems == []
    assert ("manage.py", "drain_usage") in {(e.kind, e.target) for e in entry_points}


def test_k8s_and_compose_run_the_same_roles_with_the_same_settings() -> None:
    """The same entry points (queues included) in both, and per role k8s sets every
    variable compose sets (compose passes secrets as NAME_FILE, k8s as NAME), the same
    secrets and the same Redis user."""
    docs = k8s_documents()
    sources = k8s_env_sources(docs)
    in_k8s, _ = _k8s_problems(docs)
    in_compose, _ = manifest_problems(_compose_containers(), {})
    assert set(in_compose) == set(in_k8s), (in_compose, in_k8s)
    by_where = {c.where: c for c in [*k8s_containers(docs), *_compose_containers()]}

    def names(where: str) -> set[str]:
        env, _ = container_env(by_where[where], sources)
        return {n.removesuffix("_FILE") for n in env}

    def redis_user(where: str) -> str | None:
        env, _ = container_env(by_where[where], sources)
        return urlsplit(env["REDIS_URL"]).username if "REDIS_URL" in env else None

    for entry in in_compose:
        for compose_where in in_compose[entry]:
            for k8s_where in in_k8s[entry]:
                missing = names(compose_where) - names(k8s_where)
                assert not missing, (compose_where, k8s_where, missing)
                secrets = {"DJANGO_SECRET_KEY", "MANTLE_API_KEY_PEPPER", "MANTLE_IDENTITY_KEY"}
                assert names(compose_where) & secrets == names(k8s_where) & secrets, entry
                assert redis_user(compose_where) == redis_user(k8s_where), entry

    # Per pool, the same pool name and slot count.
    def pools(containers: list[Container], sources: Any) -> dict[str, tuple[str, str]]:
        found = {}
        for c in containers:
            env, _ = container_env(c, sources)
            if "MANTLE_POOL" in env:
                found[env["MANTLE_POOL"]] = (env["MANTLE_POOL"], env.get("MANTLE_CONCURRENCY", ""))
        return found

    assert pools(_compose_containers(), {}) == pools(k8s_containers(docs), sources)


def test_each_role_holds_only_its_own_secrets() -> None:
    """Workers (tenant-uploaded graphs) hold no database URL, Django secret, pepper,
    identity key or Stripe key; every other role exactly the secrets its settings require
    (core/secret_checks.py); each reaches Redis as its own ACL user."""
    docs = k8s_documents()
    assert secret_problems(k8s_containers(docs), k8s_env_sources(docs)) == []
    assert secret_problems(_compose_containers(), {}) == []
    workers = [c for c in _compose_containers() if "workers.celery_app" in c.argv]
    assert len(workers) == 2


def test_every_pod_is_hardened() -> None:
    assert hardening_problems(k8s_documents()) == []


def test_network_policies_allow_each_role_only_what_it_uses() -> None:
    docs = k8s_documents()
    assert network_problems(docs) == []
    reach = network_reach(docs)
    worker = reach["k8s Deployment/mantle-worker-cpu"]
    assert {port for port, _ in worker.egress} == {53, 443, 5672, 6379}
    assert worker.ingress_ports == frozenset({9102})  # Prometheus, for /metrics only
    assert compose_network_problems(compose_file(VARIABLES)) == []


def test_the_worker_redis_user_can_do_what_workers_do_and_no_more() -> None:
    """Every Redis call of workers/ as the `worker` ACL user (a missing permission would
    break production silently; the end-to-end test takes only the happy path), then what a
    compromised worker would try on the usage stream and on the cancels."""
    from workers.contract import (
        USAGE_STREAM,
        BillingIdentity,
        GenerateRequest,
        ModelRef,
        SamplingParams,
        cancel_key,
        pool_live_key,
        task_claim_key,
    )
    from workers.heartbeat import Heartbeat, NodeStats, outwait_previous_process
    from workers.serving import WorkerRuntime
    from workers.settings import WorkerSettings

    def request(rid: str) -> GenerateRequest:
        return GenerateRequest(
            request_id=rid,
            model=ModelRef("echo-1", "echo", "e" * 64, ""),
            identity=BillingIdentity("org-1", "proj-1", "key-1", "ep-1", "mv-1", "echo"),
            prompt_token_ids=(5, 6, 7),
            sampling=SamplingParams(max_tokens=2, temperature=0.0),
            deadline=time.time() + 30,
            enqueued_at=time.time(),
        )

    admin = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    with redis_acl_users(settings.REDIS_URL, suffix=f"-acl{os.getpid()}") as users:
        url = retarget(
            settings.REDIS_URL,
            userinfo=":".join(users["worker"]),
            path=urlsplit(settings.REDIS_URL).path,
        )
        worker = redis.Redis.from_url(url, decode_responses=True)
        node, pool = "acl-node", "acl-pool"
        config = dataclasses.replace(WorkerSettings.from_env(), node=node, pool=pool)
        runtime = WorkerRuntime(config, worker)
        try:
            # Claim, stream, usage; then a copy whose owner died before writing anything:
            # the claim's owner and stream are read and the claim taken over (its script).
            assert runtime.serve_generate(request("acl-1")).usage_emitted
            admin.set(task_claim_key("acl-2"), "dead-node")
            assert runtime.serve_generate(request("acl-2")).usage_emitted
            assert runtime.serve_generate(request("acl-2")).status == "duplicate"
        finally:
            runtime.stop_engines()
        assert worker.mget([cancel_key("acl-1")]) == [None]  # the engines' cancel poll
        stats = NodeStats((), (), 1, 1, 0.0)
        beat = Heartbeat(worker, node=node, pool=pool, queues=("q",), stats=lambda: stats)
        beat.beat()
        assert outwait_previous_process(worker, node=node, pool=pool, sleep=lambda _: None) > 0
        beat.stop()
        assert admin.zrange(pool_live_key(pool), 0, -1) == []
        assert admin.xlen(USAGE_STREAM) == 2

        for attempt in (
            lambda: worker.set(USAGE_STREAM, "x"),  # would drop every event not yet drained
            lambda: worker.delete(USAGE_STREAM),
            lambda: worker.xrange(USAGE_STREAM, count=1),
            lambda: worker.set(cancel_key("acl-1"), "1"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                attempt()
        assert admin.type(USAGE_STREAM) == "stream"


def _mutated(old: str, new: str) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    def mutate(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        text = yaml.safe_dump_all(docs)
        assert old in text, old
        return [d for d in yaml.safe_load_all(text.replace(old, new, 1)) if d]

    return mutate


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("inference.cpu", "inference.gpu"),  # queue no longer the pool's
        ("MANTLE_POOL", "MANTLE_POOOL"),  # a variable nothing reads
        ("MANTLE_ARTIFACT_DIR", "MANTLE_ARTIFACTS_DIR"),  # ... in the ConfigMap
        ("drain_usage", "drain_usag"),  # no such management command
        ("--consumer", "--consumr"),  # no such option of it
        ("workers.celery_app", "workers.celery_ap"),  # no such module
        ("config.asgi:application", "config.asgi:app"),  # no such ASGI app
        ("--without-gossip", "--without-gosip"),  # no such celery option
        ("control,billing", "control"),  # beat sends billing tasks nobody consumes
        ("name: mantle-env", "name: mantle-envs"),  # envFrom of a ConfigMap that is not
    ],
)
def test_a_typo_in_a_manifest_fails_the_checks(old: str, new: str) -> None:
    _, problems = _k8s_problems(_mutated(old, new)(k8s_documents()))
    assert problems, f"{old} -> {new} went unnoticed"


def _without(name: str) -> Callable[[list[dict[str, Any]]], list[dict[str, Any]]]:
    return lambda docs: [d for d in docs if d["metadata"]["name"] != name]


def _worker_reaches_postgres(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    policy = next(d for d in docs if d["metadata"]["name"] == "worker")
    policy["spec"]["egress"].append(
        {"to": [{"ipBlock": {"cidr": "10.40.1.0/24"}}], "ports": [{"port": 5432}]}
    )
    return docs


WEAKENED = {
    "worker given the gateway's secrets": _mutated(
        "name: mantle-worker-secrets", "name: mantle-gateway-secrets"
    ),
    "drain given the control worker's": _mutated(
        "name: mantle-drain-secrets", "name: mantle-control-secrets"
    ),
    "worker as the gateway's Redis user": _mutated(
        "redis://worker:change-me", "redis://gateway:change-me"
    ),
    "writable root": _mutated("readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false"),
    "token mounted": _mutated(
        "automountServiceAccountToken: false", "automountServiceAccountToken: true"
    ),
    "capabilities kept": _mutated("- ALL", "- NET_RAW"),
    "no default deny": _without("default-deny"),
    "worker reaches PostgreSQL": _worker_reaches_postgres,
}


@pytest.mark.parametrize("weaken", WEAKENED.values(), ids=WEAKENED.keys())
def test_a_weakened_manifest_fails_the_checks(
    weaken: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
) -> None:
    docs = weaken(k8s_documents())
    problems = (
        secret_problems(k8s_containers(docs), k8s_env_sources(docs))
        + hardening_problems(docs)
        + network_problems(docs)
    )
    assert problems


def _size_bytes(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    text = text.strip().lower()
    if text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def test_the_ingress_lets_an_upload_of_the_file_limit_through_and_nothing_else_that_large() -> None:
    """The edge's body limit for POST /v1/files holds a file of MANTLE_FILE_MAX_BYTES with
    its multipart framing and streams it on (the gateway cuts it while it streams); every
    other path keeps the small limit."""
    from django.conf import settings

    from gateway.endpoints.files import MULTIPART_OVERHEAD_BYTES

    ingresses = [d for d in k8s_documents() if d.get("kind") == "Ingress"]
    limits: dict[str, tuple[int, dict[str, str]]] = {}
    for doc in ingresses:
        notes = doc["metadata"].get("annotations", {})
        size = _size_bytes(notes["nginx.ingress.kubernetes.io/proxy-body-size"])
        for rule in doc["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                limits[path["path"]] = (size, notes)
    files_size, files_notes = limits["/v1/files"]
    assert files_size >= settings.MANTLE_FILE_MAX_BYTES + MULTIPART_OVERHEAD_BYTES
    assert files_notes["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    others = [size for path, (size, _) in limits.items() if path != "/v1/files"]
    assert others and max(others) <= settings.DATA_UPLOAD_MAX_MEMORY_SIZE * 2


def autoscaling_problems(docs: list[dict[str, Any]]) -> list[str]:
    """deploy/k8s/autoscaling.yaml against the worker Deployments: one KEDA ScaledObject
    per worker Deployment, on the queues that Deployment consumes (its -Q and the priority
    tier's, workers/contract.py) and on the engines' waiting requests (workers/metrics.py)
    of its MANTLE_POOL, served on the port the Deployment names and annotates."""
    from workers import metrics
    from workers.contract import priority_queue

    deployments = {
        d["metadata"]["name"]: d
        for d in docs
        if d.get("kind") == "Deployment" and d["metadata"]["name"].startswith("mantle-worker-")
    }
    scaled = {
        d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d.get("kind") == "ScaledObject"
    }
    problems = []
    if set(scaled) != set(deployments):
        problems.append(f"ScaledObjects for {sorted(scaled)}, workers {sorted(deployments)}")
    for name, deployment in deployments.items():
        if name not in scaled:
            continue
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        pool = env.get("MANTLE_POOL", "")
        argv = [str(a) for a in container["command"]]
        if argv[argv.index("-Q") + 1] != inference_queue(pool):
            problems.append(f"{name}: consumes {argv[argv.index('-Q') + 1]}, pool {pool}")
        port = str(env.get("MANTLE_WORKER_METRICS_PORT", ""))
        served = {str(p["containerPort"]) for p in container.get("ports", [])}
        annotated = deployment["spec"]["template"]["metadata"].get("annotations", {})
        if served != {port} or annotated.get("prometheus.io/port") != port:
            problems.append(f"{name}: metrics on {port!r}, serves {served}, annotated {annotated}")
        spec = scaled[name]["spec"]
        queues = {t["metadata"]["queueName"] for t in spec["triggers"] if t["type"] == "rabbitmq"}
        if queues != {inference_queue(pool), priority_queue(pool)}:
            problems.append(f"{name}: scales on queues {sorted(queues)}, pool {pool}")
        queries = [t["metadata"]["query"] for t in spec["triggers"] if t["type"] == "prometheus"]
        wanted = f'sum({metrics.ENGINE_WAITING}{{pool="{pool}"}})'
        if queries != [wanted]:
            problems.append(f"{name}: scales on {queries}, not {wanted}")
        if not 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]:
            problems.append(
                f"{name}: replicas {spec['minReplicaCount']}..{spec['maxReplicaCount']}"
            )
    return problems


def test_every_worker_pool_scales_on_its_queues_and_its_engines_backlog() -> None:
    docs = k8s_documents()
    assert any(d.get("kind") == "ScaledObject" for d in docs)
    assert autoscaling_problems(docs) == []
    # A pool renamed in its Deployment alone, a metric renamed, a trigger dropped: found.
    for old, new in (
        ("value: cpu\n", "value: cpu2\n"),
        ("mantle_worker_engine_waiting_requests", "mantle_worker_waiting"),
        ("queueName: inference.cpu.priority", "queueName: inference.cpu"),
    ):
        assert autoscaling_problems(_mutated(old, new)(docs)), f"{old} -> {new} went unnoticed"


def thread_sizing_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Each worker container that requests CPUs caps ONNX Runtime's threads at that request
    (the Downward API, in millicores: workers/runtime/cpus.py rounds down); without it a
    worker on a 64-core node would run 64 threads per session on the 8 cores it asked for."""
    problems = []
    for doc in docs:
        if doc.get("kind") != "Deployment":
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            if "workers.celery_app" not in " ".join(c.get("command", [])):
                continue
            cpu = (c.get("resources") or {}).get("requests", {}).get("cpu")
            if cpu is None:
                continue
            env = {e["name"]: e for e in c.get("env", [])}
            if "MANTLE_ORT_THREADS" in env:  # would override the artifact's and the quota
                problems.append(f"{doc['metadata']['name']}: sets MANTLE_ORT_THREADS")
            ref = (env.get("MANTLE_CPU_REQUEST_MILLICORES") or {}).get("valueFrom", {})
            field_ref = ref.get("resourceFieldRef", {})
            if field_ref.get("resource") != "requests.cpu" or field_ref.get("divisor") != "1m":
                problems.append(
                    f"{doc['metadata']['name']}: requests {cpu} CPUs but "
                    "MANTLE_CPU_REQUEST_MILLICORES is not set from requests.cpu in millicores"
                )
    return problems


def test_every_cpu_worker_sizes_its_threads_from_its_cpu_request() -> None:
    docs = k8s_documents()
    assert thread_sizing_problems(docs) == []
    assert thread_sizing_problems(_mutated("resource: requests.cpu", "resource: limits.cpu")(docs))
    assert thread_sizing_problems(_mutated("divisor: 1m", "divisor: '1'")(docs))
    assert thread_sizing_problems(
        _mutated("MANTLE_CPU_REQUEST_MILLICORES", "MANTLE_ORT_THREADS")(docs)
    )
