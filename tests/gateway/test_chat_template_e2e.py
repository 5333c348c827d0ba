"""A tenant's hostile chat template on a real gateway: its requests get 400s, others are served."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from catalog.models import Endpoint
from catalog.services import endpoint_publish
from tests.factories import OrganizationFactory, make_api_key, make_model_version
from tests.gateway.conftest import ECHO, Served

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.models]

# One template, three attacks, picked by the first message. Every one would pin the
# gateway's event loop for minutes (or take gigabytes) if rendered there unbounded.
HOSTILE = (
    "{% set attack = messages[0].content %}"
    "{% if attack == 'loops' %}"
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    "{% elif attack == 'repeat' %}{{ 'x' * 10000000000 }}"
    "{% elif attack == 'slow' %}"  # fewer items than the loop cap; time stops it
    "{% for a in range(1000) %}{% for b in range(999) %}"
    "{% if (''.ljust(100000)|length) < 0 %}x{% endif %}{% endfor %}{% endfor %}"
    "{% endif %}"
    "{% for m in messages %}{{ m.content }}{% endfor %}"
)
TIME = "chat template ran past its time budget of 1 s"
EXPECTED = {
    # The loop cap (about half a second of looping) or, on a busy machine, the clock.
    "loops": ("chat template loops more than 1000000 times (nested loops?)", TIME),
    "repeat": ("chat template builds a repeated value of 10000000000 characters",),
    "slow": (TIME,),
}


def hostile_endpoint(served: Served) -> tuple[Endpoint, str]:
    org = OrganizationFactory()
    _, secret = make_api_key(org, scopes=["inference"])
    echo = served.endpoints[ECHO]
    base = echo.model_version
    manifest = {
        **base.manifest,
        "name": f"hostile-{org.id}",
        "kind": "chat",
        "runtime": base.runtime,
        "sha256": base.sha256,
        "location": base.location,
        "tokenizer_file": base.tokenizer_file,
    }
    version = make_model_version(org, manifest, model_name=f"hostile-{org.id}")
    version.chat_template = HOSTILE
    version.save(update_fields=["chat_template"])
    endpoint = Endpoint.objects.create(
        organization=org, name="hostile", pool=echo.pool, model_version=version
    )
    endpoint_publish(endpoint)
    return endpoint, secret


def test_a_hostile_template_gets_400s_while_another_organization_is_served(
    served: Served,
) -> None:
    endpoint, hostile_secret = hostile_endpoint(served)
    hostile = served.client(secret=hostile_secret)
    # Short timeouts: a gateway that rendered on its event loop would not answer in time.
    innocent = served.client()
    innocent = innocent.with_options(timeout=30)
    stop = threading.Event()
    refusals: list[tuple[str, int, str | None, object, object]] = []

    def attack(kind: str) -> None:
        while not stop.is_set():
            try:
                hostile.with_options(timeout=30).chat.completions.create(
                    model=endpoint.id, messages=[{"role": "user", "content": kind}], max_tokens=1
                )
            except openai.APIStatusError as exc:
                body = exc.body if isinstance(exc.body, dict) else {}
                refusals.append(
                    (kind, exc.status_code, exc.code, body.get("param"), body.get("message", ""))
                )
            else:
                refusals.append((kind, 200, None, None, ""))

    with ThreadPoolExecutor(3) as attackers:
        running = [attackers.submit(attack, kind) for kind in EXPECTED]
        try:
            answers = []
            for i in range(12):
                completion = innocent.chat.completions.create(
                    model=ECHO,
                    messages=[{"role": "user", "content": f"still here {i}"}],
                    max_tokens=4,
                )
                answers.append(completion.choices[0].message.content)
                assert innocent.models.retrieve(ECHO).id == ECHO
        finally:
            stop.set()
            for future in running:
                future.result()

    assert len(answers) == 12 and all(answers)
    assert {kind for kind, *_ in refusals} == set(EXPECTED)
    for kind, status, code, param, message in refusals:
        assert (status, code, param) == (400, "chat_template_budget_exceeded", "messages")
        prefix = f"model `{endpoint.id}`'s "
        assert any(message.startswith(prefix + words) for words in EXPECTED[kind]), message
    # The hostile organization's well-formed requests still work once it stops attacking.
    ok = hostile.chat.completions.create(
        model=endpoint.id, messages=[{"role": "user", "content": "hello"}], max_tokens=2
    )
    assert ok.choices[0].message.content
    assert served.live.gateway.alive()
