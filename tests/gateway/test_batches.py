"""Batches below the HTTP layer: validation of input lines, leases, lines stored once,
cancellation rules, the Batch object."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.test import override_settings
from django.utils import timezone

from accounts.principal import SYSTEM
from catalog.models import Endpoint
from catalog.services import endpoint_create
from gateway.batch_runner import (
    BatchRun,
    LeaseLost,
    LinesNotStored,
    PoolSlots,
    batch_claim,
    batch_finalize,
    batch_release,
    batch_renew,
    batch_store_lines,
    estimate_tokens,
    validate_lines,
)
from gateway.batches import Creator, Status, batch_cancel, batch_create, batch_object
from gateway.dispatch import worker_lost
from gateway.errors import OpenAIError
from gateway.models import Batch, BatchLine, File
from gateway.protocol import ChatCompletionRequest
from gateway.protocol_batches import BatchCreateRequest
from tests.conftest import OrgWorld
from tests.factories import (
    UNSERVED_ENCODER,
    OrganizationFactory,
    make_model_version,
    make_pool,
)

pytestmark = pytest.mark.django_db


def endpoint_of(org: Any, name: str = "chatty") -> Endpoint:
    version = make_model_version(org, UNSERVED_ENCODER, model_name=f"{name}-{org.id}")
    return endpoint_create(
        principal=SYSTEM,
        org=org,
        name=name,
        model_version_id=version.id,
        pool=make_pool("cpu").name,
    )


def new_batch(org: Any, endpoint: str = "/v1/chat/completions", **fields: Any) -> Batch:
    now = timezone.now()
    values: dict[str, Any] = {
        "id": f"batch_{abs(hash((org.id, now))) % 10**12:012d}",
        "organization": org,
        "project_id": "proj",
        "api_key_id": "key",
        "endpoint": endpoint,
        "input_file_id": "file-x",
        "created_at": now,
        "expires_at": now + timedelta(hours=24),
        **fields,
    }
    return Batch.objects.create(**values)


def line(custom_id: str, model: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": "hi"}], **body},
    }


def numbered(*items: dict[str, Any] | bytes) -> Iterator[tuple[int, bytes]]:
    for number, item in enumerate(items, start=1):
        yield number, item if isinstance(item, bytes) else json.dumps(item).encode()


def test_good_lines_are_counted_with_their_model_and_estimated_tokens(world: OrgWorld) -> None:
    model = endpoint_of(world.org).id
    batch = new_batch(world.org)

    found = validate_lines(
        batch, numbered(line("a", model, max_tokens=10), b"", line("b", model, max_tokens=5, n=2))
    )

    assert found.errors == []
    assert (found.total, found.model) == (2, model)
    first = json.dumps(line("a", model, max_tokens=10)).encode()
    second = json.dumps(line("b", model, max_tokens=5, n=2)).encode()
    assert found.tokens == len(first) // 4 + 1 + 10 + len(second) // 4 + 1 + 10


def test_every_kind_of_bad_line_is_named_with_its_number(world: OrgWorld) -> None:
    mine = endpoint_of(world.org).id
    theirs = endpoint_of(OrganizationFactory(), "theirs").id
    other_mine = endpoint_of(world.org, "second").id
    batch = new_batch(world.org)

    found = validate_lines(
        batch,
        numbered(
            line("a", mine),
            b"{not json",
            line("a", mine),
            {**line("c", mine), "url": "/v1/embeddings"},
            line("d", mine, stream=True),
            {**line("e", mine), "body": {"messages": []}},
            line("f", theirs),
            line("g", other_mine),
            {**line("h", mine), "method": "GET"},
            {**line("i", mine), "extra": 1},
        ),
    )

    assert [(e["line"], e["code"]) for e in found.errors] == [
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "invalid_url"),
        (5, "invalid_request"),
        (6, "missing_required_parameter"),
        (7, "model_not_found"),
        (8, "mismatched_model"),
        (9, "invalid_request"),
        (10, "invalid_request"),
    ]
    assert found.errors[5]["message"].startswith(f"The model `{theirs}` does not exist")


@override_settings(MANTLE_BATCH_MAX_LINES=2)
def test_a_file_past_the_line_limit_fails_and_an_empty_one_too(world: OrgWorld) -> None:
    model = endpoint_of(world.org).id
    batch = new_batch(world.org)
    found = validate_lines(batch, numbered(*(line(f"l{i}", model) for i in range(5))))
    assert [e["code"] for e in found.errors] == ["too_many_requests"]
    assert [e["code"] for e in validate_lines(batch, numbered(b"", b"  ")).errors] == ["empty_file"]


def test_embeddings_lines_reserve_no_output_tokens(world: OrgWorld) -> None:
    raw = b'{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{}}'
    assert estimate_tokens(raw, {}, "/v1/embeddings") == len(raw) // 4 + 1
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}
    assert estimate_tokens(raw, chat, "/v1/chat/completions") == len(raw) // 4 + 8


def test_the_estimate_reads_numbers_as_the_endpoint_will_run_them(world: OrgWorld) -> None:
    """`"n": "8"` and `"max_tokens": "1000.0"` are coerced by the endpoint's request model;
    an estimate that read JSON integers only would count them as 1 and the default, and a
    batch could queue far more than the limit says."""
    raw = b"x" * 40
    coerced = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": "1000",
        "n": "8",
    }
    runs_as = ChatCompletionRequest.model_validate(coerced)
    assert (runs_as.max_tokens, runs_as.n) == (1000, 8)  # what the endpoint will do

    assert estimate_tokens(raw, coerced, "/v1/chat/completions") == 11 + 8000
    responses = {"model": "m", "input": "hi", "max_output_tokens": 300.0}
    assert estimate_tokens(raw, responses, "/v1/responses") == 11 + 300
    # A body the endpoint refuses is a 400 at run time, never billed: its bytes only.
    assert estimate_tokens(raw, {"model": "m", "n": "many"}, "/v1/chat/completions") == 11


@pytest.mark.django_db(transaction=True)
def test_a_batch_has_one_runner_until_its_lease_expires(world: OrgWorld) -> None:
    batch = new_batch(world.org)

    taken = batch_claim("runner-a", [])
    assert taken is not None and taken.id == batch.id
    assert batch_claim("runner-b", []) is None
    assert batch_renew(batch.id, "runner-b") is None
    assert batch_renew(batch.id, "runner-a") == (Status.VALIDATING, batch.expires_at)

    Batch.objects.filter(id=batch.id).update(lease_until=timezone.now() - timedelta(seconds=1))
    again = batch_claim("runner-b", [])
    assert again is not None and again.runner == "runner-b"
    assert batch_renew(batch.id, "runner-a") is None  # the first runner learns it lost it


@pytest.mark.django_db(transaction=True)
def test_a_line_is_stored_and_counted_once_and_only_under_the_lease(world: OrgWorld) -> None:
    batch = new_batch(world.org, status=Status.IN_PROGRESS, runner="runner-a")

    batch_store_lines(batch.id, "runner-a", [(1, True, "{}"), (2, False, "{}")])
    batch_store_lines(batch.id, "runner-a", [(1, True, '{"again": 1}'), (3, True, "{}")])
    with pytest.raises(LeaseLost):
        batch_store_lines(batch.id, "runner-b", [(4, True, "{}")])

    batch.refresh_from_db()
    assert (batch.request_completed, batch.request_failed) == (2, 1)
    stored = dict(BatchLine.objects.filter(batch=batch).values_list("line", "output_json"))
    assert stored == {1: "{}", 2: "{}", 3: "{}"}


def test_cancel_moves_a_running_batch_to_cancelling_and_refuses_a_finished_one(
    world: OrgWorld,
) -> None:
    running = new_batch(world.org, status=Status.IN_PROGRESS)
    done = new_batch(world.org, status=Status.COMPLETED)

    cancelled = batch_cancel(world.org.id, running.id)
    assert cancelled.status == Status.CANCELLING and cancelled.cancelling_at is not None
    assert batch_cancel(world.org.id, running.id).status == Status.CANCELLING  # idempotent
    with pytest.raises(OpenAIError) as refused:
        batch_cancel(world.org.id, done.id)
    assert refused.value.status == 409
    with pytest.raises(OpenAIError) as missing:
        batch_cancel(OrganizationFactory().id, running.id)
    assert missing.value.status == 404


def test_the_batch_object_has_openais_shape(world: OrgWorld) -> None:
    batch = new_batch(
        world.org,
        status=Status.FAILED,
        errors_json=json.dumps(
            [{"code": "invalid_url", "message": "m", "param": "url", "line": 3}]
        ),
        metadata_json=json.dumps({"user": {"k": "v"}}),
        request_total=4,
    )
    shaped = batch_object(batch)
    assert shaped["object"] == "batch"
    assert shaped["errors"] == {
        "object": "list",
        "data": [{"code": "invalid_url", "message": "m", "param": "url", "line": 3}],
    }
    assert shaped["metadata"] == {"k": "v"}
    assert shaped["request_counts"] == {"total": 4, "completed": 0, "failed": 0}
    assert shaped["output_file_id"] is None and shaped["in_progress_at"] is None
    assert shaped["expires_at"] == int(batch.expires_at.timestamp())


@pytest.mark.django_db(transaction=True)
@override_settings(MANTLE_BATCH_ORG_RUNNING=1)
def test_an_organization_with_a_batch_running_waits_while_another_is_served(
    world: OrgWorld,
) -> None:
    busy_first = new_batch(world.org)
    busy_second = new_batch(world.org)
    other = new_batch(OrganizationFactory())
    Batch.objects.filter(id=busy_second.id).update(created_at=timezone.now())
    Batch.objects.filter(id=other.id).update(created_at=timezone.now() + timedelta(seconds=1))

    first = batch_claim("runner-a", [])
    second = batch_claim("runner-b", [])

    assert first is not None and first.id == busy_first.id
    # The organization's second batch is older than the other one's, but waits.
    assert second is not None and second.id == other.id
    assert batch_claim("runner-c", []) is None


def test_validation_errors_stay_small_whatever_the_lines_name(world: OrgWorld) -> None:
    model = endpoint_of(world.org).id
    batch = new_batch(world.org)
    huge = "m" * 100_000
    lines = [{**line(f"l{i}", model), huge: 1} for i in range(150)]

    found = validate_lines(batch, numbered(*lines))

    assert found.error_count == 150 and len(found.errors) == 100
    assert len(json.dumps(found.errors)) < 100 * 600
    assert all(len(e["param"] or "") <= 64 and len(e["message"]) <= 256 for e in found.errors)


@pytest.mark.django_db(transaction=True)
def test_organizations_take_turns_whatever_the_age_of_their_batches(world: OrgWorld) -> None:
    """The claim goes to the organization with the fewest batches running: one customer's
    hundred old batches do not make a newer customer's batch wait behind all of them."""
    piled = [new_batch(world.org) for _ in range(3)]
    newcomer = new_batch(OrganizationFactory())
    Batch.objects.filter(id=newcomer.id).update(created_at=timezone.now() + timedelta(hours=1))

    first = batch_claim("runner-a", [])
    second = batch_claim("runner-b", [])
    third = batch_claim("runner-c", [])

    assert first is not None and first.id == piled[0].id
    assert second is not None and second.id == newcomer.id  # newer, but its turn
    assert third is not None and third.id == piled[1].id


@pytest.mark.django_db(transaction=True)
@override_settings(MANTLE_BATCH_ORG_RUNNING=1)
def test_a_parked_batch_is_not_claimed_until_its_back_off_ends_nor_counted_as_running(
    world: OrgWorld,
) -> None:
    """A batch whose pool offers batches nothing lets go of its runner with a back-off: no
    runner takes it again before the back-off ends, and meanwhile it does not count against
    its organization's running batches (its other batch runs)."""
    parked = new_batch(world.org)
    waiting = new_batch(world.org)
    Batch.objects.filter(id=waiting.id).update(created_at=timezone.now() + timedelta(seconds=1))
    taken = batch_claim("runner-a", [])
    assert taken is not None and taken.id == parked.id

    batch_release(parked.id, "runner-a", back_off_s=60)

    row = Batch.objects.get(id=parked.id)
    assert row.runner == "" and row.lease_until is not None
    again = batch_claim("runner-b", [])
    assert again is not None and again.id == waiting.id
    assert batch_claim("runner-c", []) is None
    Batch.objects.filter(id=parked.id).update(lease_until=timezone.now() - timedelta(seconds=1))
    Batch.objects.filter(id=waiting.id).update(status=Status.COMPLETED)
    back = batch_claim("runner-c", [])
    assert back is not None and back.id == parked.id


@pytest.mark.django_db(transaction=True)
@override_settings(MANTLE_BATCH_ORG_ACTIVE=2)
def test_an_organization_has_at_most_its_active_batches(world: OrgWorld) -> None:
    File.objects.create(
        id="file-in",
        organization=world.org,
        purpose="batch",
        filename="in.jsonl",
        bytes=1,
        location="x",
        created_at=timezone.now(),
    )
    creator = Creator(world.org.id, "proj", "key")
    body = BatchCreateRequest.model_validate(
        {"input_file_id": "file-in", "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    )
    first = batch_create(creator, body)
    batch_create(creator, body)

    with pytest.raises(OpenAIError) as refused:
        batch_create(creator, body)

    assert refused.value.status == 429 and refused.value.code == "batch_limit_reached"
    assert "MANTLE_BATCH_ORG_ACTIVE" in refused.value.message
    Batch.objects.filter(id=first.id).update(status=Status.COMPLETED)
    assert batch_create(creator, body).status == Status.VALIDATING  # an ended one made room


@pytest.mark.django_db(transaction=True)
def test_finalize_with_lines_missing_sends_the_batch_back_to_run_them(world: OrgWorld) -> None:
    """A batch never ends with a line in neither file: a finalize that finds fewer stored
    lines than the batch holds puts it back in progress (cancelling, if it was) and raises."""
    batch = new_batch(
        world.org,
        status=Status.FINALIZING,
        runner="runner-a",
        request_total=3,
        in_progress_at=timezone.now(),
    )
    batch_store_lines(batch.id, "runner-a", [(1, True, "{}"), (2, True, "{}")])

    with pytest.raises(LinesNotStored):
        batch_finalize(batch.id, "runner-a")

    row = Batch.objects.get(id=batch.id)
    assert row.status == Status.IN_PROGRESS and not row.output_file_id
    assert BatchLine.objects.filter(batch_id=batch.id).count() == 2
    Batch.objects.filter(id=batch.id).update(status=Status.FINALIZING, cancelling_at=timezone.now())
    with pytest.raises(LinesNotStored):
        batch_finalize(batch.id, "runner-a")
    assert Batch.objects.get(id=batch.id).status == Status.CANCELLING


@pytest.mark.django_db(transaction=True)
@override_settings(MANTLE_BATCH_MAX_WORKERS_LOST=2)
def test_lines_that_kill_their_worker_twice_stop_the_batch(world: OrgWorld) -> None:
    """A lost attempt is not billed, so an input that kills workers would cost the platform
    three crashes per line for free: a line whose worker dies under it twice is not tried a
    third time, and a batch with MANTLE_BATCH_MAX_WORKERS_LOST such lines stops, its unrun
    lines written as `batch_workers_lost`. (The gateway's answer for a lost worker is played
    here; the worker's death itself is tests/gateway/test_batches_e2e.py's.)"""
    batch = new_batch(world.org, status=Status.IN_PROGRESS, runner="runner-a")
    run = BatchRun(batch, "runner-a")
    run.slots = PoolSlots("crashpool")
    run.digest = "digest"
    lost = worker_lost().body()
    calls: list[str] = []

    async def dies(body: bytes, request_id: str) -> tuple[int, Any]:
        calls.append(request_id)
        return 502, lost

    run._call = dies  # type: ignore[method-assign]
    raw = json.dumps(line("a", "m")).encode()

    async def two_lines() -> None:
        await run._line(1, raw, "m1")
        assert not run.stopping()
        await run._line(2, raw, "m2")

    asyncio.run(two_lines())

    short = batch.id.removeprefix("batch_")
    assert calls == [f"req_{short}_1_1", f"req_{short}_1_2", f"req_{short}_2_1", f"req_{short}_2_2"]
    assert run.workers_lost == 2 and run.stopping()
    stored = [json.loads(text) for _, _, text in run.rows]
    assert [s["response"]["body"]["error"]["code"] for s in stored] == ["worker_lost"] * 2
    assert run._unrun_reason(False)[0] == "batch_workers_lost"
