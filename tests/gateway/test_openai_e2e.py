"""The /v1 API end to end with the official `openai` client: real server, worker, models."""

from __future__ import annotations

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from django.conf import settings
from redis import Redis

from accounts import services as account_services
from accounts.principal import SYSTEM
from catalog.models import Endpoint
from catalog.services import endpoint_publish, pool_ensure
from core.redis import get_redis
from tests.factories import OrganizationFactory, make_api_key
from tests.gateway.conftest import CHAT, ECHO, EMBED, Served
from workers.contract import USAGE_STREAM, inference_queue, worker_info_key

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True), pytest.mark.models]

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def usage_events(request_id: str) -> list[dict[str, str]]:
    entries = get_redis().xrange(USAGE_STREAM)
    return [fields for _, fields in entries if fields.get("request_id") == request_id]  # type: ignore[union-attr]


def wait_usage(request_id: str, timeout: float = 20) -> list[dict[str, str]]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = usage_events(request_id)
        if found:
            time.sleep(0.3)  # a second event, if there were one, would be visible by now
            return usage_events(request_id)
        time.sleep(0.1)
    return []


# --- chat --------------------------------------------------------------------------------


def test_chat_greedy_answers_paris_with_usage_and_headers(served: Served) -> None:
    raw = served.client().chat.completions.with_raw_response.create(
        model=CHAT, messages=FRANCE, temperature=0, max_tokens=24
    )
    completion = raw.parse()
    assert "Paris" in (completion.choices[0].message.content or "")
    assert completion.object == "chat.completion"
    assert completion.model == CHAT
    assert completion.choices[0].finish_reason in {"stop", "length"}
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    request_id = raw.headers["x-request-id"]
    assert request_id.startswith("req_")
    assert int(raw.headers["openai-processing-ms"]) >= 0
    assert int(raw.headers["x-ratelimit-limit-requests"]) > 0
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) >= 0
    events = wait_usage(request_id)
    assert len(events) == 1
    event = events[0]
    assert (event["organization_id"], event["api_key_id"], event["project_id"]) == (
        served.org.id,
        served.key.id,
        served.key.project_id,
    )
    assert int(event["input_tokens"]) == usage.prompt_tokens
    assert int(event["output_tokens"]) == usage.completion_tokens


def test_chat_stream_with_usage_matches_non_streaming(served: Served) -> None:
    client = served.client()
    whole = client.chat.completions.create(
        model=CHAT, messages=FRANCE, temperature=0, max_tokens=20
    )
    chunks = list(
        client.chat.completions.create(
            model=CHAT,
            messages=FRANCE,
            temperature=0,
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_seed_reproducible_sampling(served: Served) -> None:
    client = served.client()
    kwargs: dict[str, Any] = dict(
        model=CHAT,
        messages=[{"role": "user", "content": "Tell me a short story."}],
        temperature=1.0,
        top_p=0.95,
        max_tokens=16,
    )
    a = client.chat.completions.create(seed=7, **kwargs).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kwargs).choices[0].message.content
    assert a == b


def test_chat_stop_sequence_and_max_completion_tokens(served: Served) -> None:
    client = served.client()
    full = client.chat.completions.create(
        model=CHAT, messages=FRANCE, temperature=0, max_completion_tokens=24
    )
    content = full.choices[0].message.content or ""
    assert "Paris" in content
    stopped = client.chat.completions.create(
        model=CHAT, messages=FRANCE, temperature=0, max_tokens=24, stop=["Paris"]
    )
    assert stopped.choices[0].message.content == content.split("Paris")[0]
    assert stopped.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(
        model=CHAT, messages=FRANCE, temperature=0, max_completion_tokens=2
    )
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 2  # type: ignore[union-attr]


# --- completions -------------------------------------------------------------------------------


def test_completions_text_and_stream(served: Served) -> None:
    client = served.client()
    done = client.completions.create(
        model=CHAT, prompt="The capital of France is", temperature=0, max_tokens=8
    )
    assert done.object == "text_completion"
    assert "Paris" in done.choices[0].text
    assert done.usage is not None and done.usage.completion_tokens <= 8
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=CHAT,
            prompt="The capital of France is",
            temperature=0,
            max_tokens=8,
            stream=True,
        )
        if c.choices
    )
    assert streamed == done.choices[0].text


def test_completions_accepts_token_arrays(served: Served) -> None:
    done = served.client().completions.create(model=ECHO, prompt=[1, 2, 3, 4], max_tokens=4)
    assert done.usage is not None and done.usage.prompt_tokens == 4


# --- embeddings ----------------------------------------------------------------------------------


def test_embeddings_float_and_base64_and_similarity(served: Served) -> None:
    client = served.client()
    sentences = [
        "A man is eating food.",
        "Someone is having a meal.",
        "The stock market crashed today.",
    ]
    # "float" asked for by name: without it the SDK asks for base64 and decodes it itself.
    result = client.embeddings.create(model=EMBED, input=sentences, encoding_format="float")
    assert all(isinstance(x, float) for d in result.data for x in d.embedding)
    vectors = np.array([d.embedding for d in result.data])
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    similar = float(vectors[0] @ vectors[1])
    unrelated = float(vectors[0] @ vectors[2])
    assert similar > unrelated + 0.3
    assert result.usage.prompt_tokens == result.usage.total_tokens > 0
    raw = httpx.post(
        f"{served.live.url}/v1/embeddings",
        timeout=60,
        headers={"authorization": f"Bearer {served.secret}"},
        json={"model": EMBED, "input": sentences[0], "encoding_format": "base64"},
    )
    encoded = raw.json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    assert decoded.shape == (384,)
    np.testing.assert_allclose(decoded, vectors[0], rtol=0, atol=1e-6)
    # Asked for base64 by name, the SDK hands the string over as the server sent it; its
    # default path asks for base64 and decodes it: both are the float vector.
    sdk = client.embeddings.create(model=EMBED, input=sentences[0], encoding_format="base64")
    sdk_encoded = sdk.data[0].embedding
    assert isinstance(sdk_encoded, str)
    sdk_decoded = np.frombuffer(base64.b64decode(sdk_encoded), dtype="<f4")
    np.testing.assert_allclose(sdk_decoded, vectors[0], rtol=0, atol=1e-6)
    default = client.embeddings.create(model=EMBED, input=sentences[0])
    np.testing.assert_allclose(default.data[0].embedding, vectors[0], rtol=0, atol=1e-6)


def test_embeddings_of_token_arrays(served: Served) -> None:
    result = served.client().embeddings.create(model=EMBED, input=[[101, 7592, 2088, 102]])
    assert len(result.data[0].embedding) == 384
    assert result.usage.prompt_tokens == 4


# --- models ------------------------------------------------------------------------------------


def test_models_list_and_retrieve(served: Served) -> None:
    client = served.client()
    ids = {m.id for m in client.models.list()}
    assert {CHAT, EMBED, ECHO} <= ids
    assert client.models.retrieve(CHAT).id == CHAT
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# --- errors ------------------------------------------------------------------------------------


def test_bad_key_is_401(served: Served) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        served.client(secret="sk-" + "x" * 48).chat.completions.create(model=CHAT, messages=FRANCE)
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"


def test_revoked_key_refused_at_once(served: Served) -> None:
    client = served.client()
    client.models.list()  # warms the gateway's cache
    account_services.api_key_revoke(principal=SYSTEM, key=served.key)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_key_without_inference_scope_is_403(served: Served) -> None:
    _, secret = make_api_key(served.org, scopes=["read-usage"])
    with pytest.raises(openai.PermissionDeniedError) as err:
        served.client(secret=secret).chat.completions.create(model=CHAT, messages=FRANCE)
    assert err.value.code == "insufficient_scope"


def test_unknown_model_and_other_organizations_endpoint_are_404(served: Served) -> None:
    client = served.client()
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-17", messages=FRANCE)
    assert err.value.code == "model_not_found"
    other = OrganizationFactory()
    private = Endpoint.objects.create(
        organization=other,
        name="private",
        pool=served.endpoints[CHAT].pool,
        model_version=served.endpoints[CHAT].model_version,
    )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=private.id, messages=FRANCE, max_tokens=2)
    _, other_secret = make_api_key(other, scopes=["inference"])
    ok = served.client(secret=other_secret).chat.completions.create(
        model=private.id, messages=FRANCE, max_tokens=2
    )
    assert ok.usage is not None


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 9}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"extra_body": {"frobnicate": True}}, "frobnicate"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ],
)
def test_invalid_parameters_are_400_naming_param(
    served: Served, params: dict[str, Any], param: str
) -> None:
    kwargs: dict[str, Any] = {"model": CHAT, "messages": FRANCE, **params}
    with pytest.raises(openai.BadRequestError) as err:
        served.client().chat.completions.create(**kwargs)
    assert err.value.param == param
    assert param.split(".")[0] in err.value.message


def test_context_length_exceeded(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        served.client().chat.completions.create(model=CHAT, messages=FRANCE, max_tokens=9000)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        served.client().embeddings.create(model=EMBED, input="x", dimensions=1024)
    assert err.value.param == "dimensions"


def test_malformed_json_is_400(served: Served) -> None:
    raw = httpx.post(
        f"{served.live.url}/v1/chat/completions",
        content=b"{not json",
        headers={"authorization": f"Bearer {served.secret}", "content-type": "application/json"},
    )
    assert raw.status_code == 400
    assert raw.json()["error"]["type"] == "invalid_request_error"


def test_rate_limited_is_429_with_retry_after(served: Served) -> None:
    _, secret = make_api_key(served.org, scopes=["inference"], rpm_limit=2)
    client = served.client(secret=secret)
    for _ in range(2):
        client.completions.create(model=ECHO, prompt="hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model=ECHO, prompt="hi", max_tokens=1)
    assert err.value.code == "rate_limit_exceeded"
    assert int(err.value.response.headers["retry-after"]) >= 1


def test_pool_without_live_worker_fails_fast_with_503(served: Served) -> None:
    pool = pool_ensure(name="nowhere", region="local", providers=["CPUExecutionProvider"])
    endpoint = Endpoint.objects.create(
        organization=served.org,
        name="stranded",
        pool=pool,
        model_version=served.endpoints[CHAT].model_version,
    )
    endpoint_publish(endpoint)
    broker = Redis.from_url(settings.CELERY_BROKER_URL)
    broker.delete(inference_queue(pool.name))
    with pytest.raises(openai.InternalServerError) as err:
        served.client().chat.completions.create(model=endpoint.id, messages=FRANCE)
    assert err.value.status_code == 503
    assert err.value.code == "no_available_worker"
    assert err.value.response.headers["retry-after"] == "5"
    # Fast because refused at admission, before dispatch: nothing was queued for a worker
    # (so nothing for the gateway to wait on) and nothing reserved. Timings are bench/'s.
    assert broker.llen(inference_queue(pool.name)) == 0
    assert not get_redis().hget(f"mantle:wallet:{served.org.id}", "reserved_nanos")


# --- concurrency and cancellation ----------------------------------------------------------------


def test_sixteen_concurrent_streams(served: Served) -> None:
    client = served.client()

    def one(i: int) -> tuple[str, int]:
        stream = client.chat.completions.create(
            model=CHAT,
            messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, chunks[-1].usage.completion_tokens  # type: ignore[union-attr]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert len(results) == 16
    assert all(text and 0 < tokens <= 12 for text, tokens in results)


def test_disconnect_cancels_generation_and_frees_the_slot(served: Served) -> None:
    worker = served.live.worker
    url = f"{served.live.url}/v1/chat/completions"
    body = {
        "model": CHAT,
        "messages": [
            {"role": "user", "content": "Write a very long essay about the history of Europe."}
        ],
        "max_tokens": 2000,
        "stream": True,
    }
    with httpx.stream(
        "POST", url, json=body, timeout=60, headers={"authorization": f"Bearer {served.secret}"}
    ) as response:
        request_id = response.headers["x-request-id"]
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content"' in line and '"role"' not in line:
                seen += 1
                if seen >= 5:
                    break
    # The client is gone: the worker stops early and records what it generated.
    events = wait_usage(request_id, timeout=30)
    assert len(events) == 1
    assert events[0]["status"] == "cancelled"
    assert seen <= int(events[0]["output_tokens"]) < 2000
    deadline = time.time() + 10
    info: dict[str, Any] = {}
    while time.time() < deadline:
        info = json.loads(get_redis().get(worker_info_key(worker.node)) or "{}")
        if info.get("free_slots") == info.get("total_slots"):
            break
        time.sleep(0.3)
    assert info["free_slots"] == info["total_slots"]


def test_two_gateway_processes_share_one_limit(served: Served) -> None:
    second, second_url = served.live.stack.gateway(name="gateway-2")
    try:
        _, secret = make_api_key(served.org, scopes=["inference"], rpm_limit=10)
        urls = [served.live.url, second_url] * 10
        outcomes: list[int] = []
        lock = threading.Lock()

        def call(url: str) -> None:
            r = httpx.post(
                f"{url}/v1/completions",
                timeout=60,
                headers={"authorization": f"Bearer {secret}"},
                json={"model": ECHO, "prompt": "hi", "max_tokens": 1},
            )
            with lock:
                outcomes.append(r.status_code)

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(call, urls))
        elapsed = time.monotonic() - started
        # The bucket holds 10 and refills one request every 6 s (10 a minute): the 20 calls
        # get the 10 plus whatever refilled while they ran, never a second 10 from the
        # other gateway (limits per process would admit all 20).
        refilled = int(elapsed * 10 / 60)
        admitted = outcomes.count(200)
        assert sorted(outcomes) == [200] * admitted + [429] * (20 - admitted), outcomes
        assert 10 <= admitted <= 10 + refilled, (admitted, elapsed)
    finally:
        served.live.stack.stop(second)


def test_insufficient_quota_is_429_and_not_retried(served: Served) -> None:
    redis = get_redis()
    redis.hset(f"mantle:wallet:{served.org.id}", mapping={"mode": "prepaid", "cap_nanos": 1000})
    redis.hset(
        f"mantle:price:{served.org.id}:{CHAT}",
        mapping={"in": 100, "out": 100, "req": 0, "ms": 0},
    )
    with pytest.raises(openai.RateLimitError) as err:
        served.client().chat.completions.create(model=CHAT, messages=FRANCE, max_tokens=50)
    assert err.value.code == "insufficient_quota"
    assert err.value.type == "insufficient_quota"
    assert err.value.response.headers["x-should-retry"] == "false"
    assert redis.hget(f"mantle:wallet:{served.org.id}", "reserved_nanos") in (None, "0")


def test_paid_request_settles_its_reservation(served: Served) -> None:
    redis = get_redis()
    wallet = f"mantle:wallet:{served.org.id}"
    redis.hset(wallet, mapping={"mode": "prepaid", "cap_nanos": 10**9})
    # The price hash carries all four units (a text model: 0 per request and compute ms).
    redis.hset(
        f"mantle:price:{served.org.id}:{CHAT}",
        mapping={"in": 150, "out": 600, "req": 0, "ms": 0},
    )
    done = served.client().chat.completions.create(
        model=CHAT, messages=FRANCE, max_tokens=16, temperature=0
    )
    usage = done.usage
    assert usage is not None
    state = redis.hgetall(wallet)
    assert state["reserved_nanos"] == "0"
    expected = usage.prompt_tokens * 150 + usage.completion_tokens * 600
    assert int(state.get("pending_nanos", 0)) + int(state.get("spent_nanos", 0)) == expected


def test_penalties_steer_greedy_decoding_away_from_repetition(served: Served) -> None:
    """frequency_penalty and presence_penalty reach the worker's engine: the same greedy
    request repeats a word less once repeating it is penalized (chat and completions)."""
    client = served.client()
    prompt = "apple, apple, apple, apple, apple, apple,"

    def complete(**penalties: float) -> str:
        completion = client.completions.create(
            model=CHAT, prompt=prompt, temperature=0, max_tokens=30, **penalties
        )
        return completion.choices[0].text.lower()

    plain = complete()
    assert plain == complete(frequency_penalty=0.0, presence_penalty=0.0)  # neutral is neutral
    penalized = complete(frequency_penalty=2.0, presence_penalty=2.0)
    # Greedy, this small model goes on repeating the word (15 more times in 30 tokens);
    # penalized, it stops repeating after a couple.
    assert plain.count("apple") >= 10, plain
    assert penalized.count("apple") <= plain.count("apple") // 2, (plain, penalized)
    # Encouraging repetition (negative penalties) is accepted too, within OpenAI's range.
    assert complete(frequency_penalty=-2.0, presence_penalty=-2.0).count("apple") >= 10
