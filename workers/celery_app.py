"""The Celery app of worker nodes, configured from the environment only."""

from __future__ import annotations

import gc
import logging
import threading
from typing import Any

from celery import Celery, signals

from workers.broker import guard_redis_unacked_restore
from workers.contract import priority_queue
from workers.heartbeat import Heartbeat, outwait_previous_process
from workers.metrics import serve_metrics
from workers.serving import WorkerRuntime
from workers.settings import WorkerSettings

logger = logging.getLogger(__name__)

settings = WorkerSettings.from_env()
guard_redis_unacked_restore()

# No fix-ups: Celery's Django fix-up switches on whenever DJANGO_SETTINGS_MODULE
# is in the environment, and a worker node must never import Django.
app = Celery("mantle_workers", broker=settings.broker_url, include=["workers.tasks"], fixups=[])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    # Results travel on the response stream, never through a result backend.
    task_ignore_result=True,
    # A request is acknowledged only once it finished; the claim key makes the
    # redelivery that this allows harmless (tasks are idempotent per request id).
    task_acks_late=True,
    # One message per free thread: a prefetched request would sit unseen by the
    # batching engine while another node could have run it.
    worker_prefetch_multiplier=1,
    # A lost worker must not requeue a half-streamed request: the client has
    # seen tokens, so it gets an error rather than a second, different answer.
    task_reject_on_worker_lost=False,
    broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
    # Enforced by the prefork pool only; with the threads pool the engines'
    # per-request deadlines are what bounds a task.
    task_soft_time_limit=settings.task_time_limit_s,
    task_time_limit=settings.task_time_limit_s + 30,
    task_default_queue=settings.queue,
    broker_connection_retry_on_startup=True,
    worker_send_task_events=False,
)

_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()
_heartbeat: Heartbeat | None = None


def get_runtime() -> WorkerRuntime:
    """The process-wide runtime, created on first use (after any fork)."""
    global _runtime
    if _runtime is None:
        with _runtime_lock:
            if _runtime is None:
                import redis

                client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
                _runtime = WorkerRuntime(settings, client)
    return _runtime


@signals.celeryd_after_setup.connect
def _consume_the_priority_queue(sender: Any = None, instance: Any = None, **_: Any) -> None:
    # Beside the pool's queue (-Q): the priority tier's (contract.priority_queue). Listed in
    # the heartbeat's queues, which is how gateways know they may send there.
    if instance is not None:
        instance.app.amqp.queues.select_add(priority_queue(settings.pool))


@signals.worker_init.connect
def _outwait_previous_process(**_: Any) -> None:
    # Before the consumer starts: a request taken now would be started under a name
    # that gateways must first see as dead.
    outwait_previous_process(get_runtime().redis, node=settings.node, pool=settings.pool)


@signals.worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    global _heartbeat
    runtime = get_runtime()
    controller = getattr(sender, "controller", None)
    concurrency = getattr(controller, "concurrency", None)
    if isinstance(concurrency, int) and concurrency > 0:
        runtime.total_slots = concurrency
    queues = tuple(
        q.name for q in getattr(getattr(sender, "task_consumer", None), "queues", ()) or ()
    ) or (settings.queue,)
    serve_metrics(runtime, settings.metrics_port)
    _heartbeat = Heartbeat(
        runtime.redis,
        node=settings.node,
        pool=settings.pool,
        queues=queues,
        stats=runtime.beat_stats,
    ).start()


@signals.worker_ready.connect
def _settle_the_heap(**_: Any) -> None:
    # What start-up left (Django, ONNX Runtime's and the tokenizers' modules, Celery) out
    # of the cyclic collector's sight: a full collection over a few hundred thousand
    # objects stalls every thread of the process (decode steps included) for over 100 ms.
    # What serving allocates later is collected as before.
    gc.collect()
    gc.freeze()


@signals.worker_shutting_down.connect
def _unlist_node(**_: Any) -> None:
    # Unlist as soon as shutdown begins, so admission stops routing new work
    # here while the tasks in flight finish.
    global _heartbeat
    heartbeat, _heartbeat = _heartbeat, None
    if heartbeat is not None:
        heartbeat.stop()


@signals.worker_shutdown.connect
def _shutdown(**_: Any) -> None:
    _unlist_node()
    if _runtime is not None:
        _runtime.stop_engines()
