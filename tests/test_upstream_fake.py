"""The fake upstream provider the relay's tests and benchmark run (tests/support/upstream_fake.py),
driven by the official openai package as a provider's client would be: its answers, its
streaming, its refusals, each fault as the client sees it, and its request log."""

from __future__ import annotations

import base64
import contextlib
import math
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.support.upstream_fake import (  # noqa: F401 - the shared fixtures, tested here
    UpstreamFake,
    upstream_fake_fixture,
    upstream_fake_server_fixture,
)

KEY = "provider-key-for-the-fake"
API_VERSION = "2024-10-21"
CHAT = "gpt-4o"  # an Azure deployment
EMBED = "text-embedding-3-small"


@pytest.fixture(scope="module")
def server() -> Iterator[UpstreamFake]:
    with UpstreamFake(key=KEY, deployments=[CHAT, EMBED]) as fake:
        yield fake


@pytest.fixture
def fake(server: UpstreamFake) -> UpstreamFake:
    server.reset()
    if server.latency_ms:
        server.set_latency(0)
    return server


def azure(fake: UpstreamFake, **options: Any) -> openai.AzureOpenAI:
    options = {"api_key": KEY, "max_retries": 0, **options}
    return openai.AzureOpenAI(
        azure_endpoint=fake.azure_endpoint, api_version=API_VERSION, **options
    )


def plain(fake: UpstreamFake, **options: Any) -> openai.OpenAI:
    options = {"api_key": KEY, "max_retries": 0, **options}
    return openai.OpenAI(base_url=fake.openai_base_url, **options)


def ask(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


def test_a_chat_answer_on_the_openai_scheme_echoes_and_counts_words(fake: UpstreamFake) -> None:
    client = plain(fake)

    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=ask("hello upstream world")
    )

    assert reply.object == "chat.completion"
    assert reply.model == "gpt-4o-mini"
    assert reply.choices[0].message.content == "echo: hello upstream world"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    # Words: "be brief" + "hello upstream world" in, "echo: hello upstream world" out.
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (5, 4)
    assert reply.usage.total_tokens == 9

    cut = client.chat.completions.create(
        model="gpt-4o-mini", messages=ask("one two three four"), max_tokens=3
    )
    assert cut.choices[0].message.content == "echo: one two"
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage is not None and cut.usage.completion_tokens == 3

    parts = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": [{"type": "text", "text": "in parts"}]}],
        max_completion_tokens=10,
    )
    assert parts.choices[0].message.content == "echo: in parts"


def test_a_chat_answer_on_the_azure_scheme_names_the_deployment(fake: UpstreamFake) -> None:
    reply = azure(fake).chat.completions.create(model=CHAT, messages=ask("hi there"))

    assert reply.model == CHAT
    assert reply.choices[0].message.content == "echo: hi there"
    assert reply.usage is not None and reply.usage.total_tokens == 4 + 3
    extra = reply.model_extra or {}
    assert extra["prompt_filter_results"][0]["content_filter_results"]["hate"]["filtered"] is False

    [seen] = fake.requests()
    assert seen["method"] == "POST"
    assert seen["path"] == f"/openai/deployments/{CHAT}/chat/completions"
    assert seen["query"] == {"api-version": API_VERSION}
    assert (seen["scheme"], seen["operation"], seen["deployment"]) == (
        "azure",
        "chat/completions",
        CHAT,
    )
    assert seen["secrets"]["api-key"] == {"present": True, "matched": True}
    assert seen["secrets"]["authorization"] == {"present": False, "matched": False}
    assert "api-key" not in seen["headers"] and KEY not in str(seen)
    assert seen["headers"]["content-type"] == "application/json"
    assert seen["body"]["messages"] == ask("hi there")
    assert (seen["status"], seen["outcome"], seen["fault"]) == (200, "answered", None)


def test_streaming_with_include_usage_ends_with_the_usage_chunk(fake: UpstreamFake) -> None:
    stream = azure(fake).chat.completions.create(
        model=CHAT,
        messages=ask("stream these four words"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    # Azure's filter chunk, the role, "echo:" and four words, the finish, the usage.
    assert len(chunks) == 1 + 1 + 5 + 1 + 1
    assert chunks[0].choices == [] and chunks[0].usage is None
    assert (chunks[0].model_extra or {})["prompt_filter_results"]
    assert chunks[1].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks[1:-1])
    assert text == "echo: stream these four words"
    assert [c.choices[0].finish_reason for c in chunks[1:-1]][-1] == "stop"
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (6, 5)
    assert last.usage.total_tokens == 11
    assert {c.id for c in chunks[1:]} == {last.id} and last.model == CHAT

    # Without include_usage: no usage chunk.
    plain_chunks = list(
        plain(fake).chat.completions.create(model="m", messages=ask("two words"), stream=True)
    )
    assert [c.choices[0].delta.content for c in plain_chunks] == [
        "",
        "echo:",
        " two",
        " words",
        None,
    ]
    assert all(c.usage is None and c.choices for c in plain_chunks)


def test_the_raw_stream_is_sse_and_ends_with_done(fake: UpstreamFake) -> None:
    with httpx.stream(
        "POST",
        f"{fake.openai_base_url}/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={
            "model": "m",
            "messages": ask("x"),
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert len(events[:-2]) == 1 + 2 + 1 + 1  # role, "echo:" "x", finish, usage


def test_completions_answer_and_stream(fake: UpstreamFake) -> None:
    client = plain(fake)

    reply = client.completions.create(model="davinci", prompt="say it back", max_tokens=3)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "echo: say it"
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.prompt_tokens == 3

    chunks = list(
        azure(fake).completions.create(
            model=CHAT, prompt="a b", stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices == []  # Azure's filter chunk
    assert "".join(c.choices[0].text for c in chunks[1:-1]) == "echo: a b"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 2 + 3


def test_embeddings_are_deterministic_unit_vectors(fake: UpstreamFake) -> None:
    # The openai package asks for base64 by default and decodes it.
    vectors = azure(fake).embeddings.create(
        model=EMBED, input=["alpha beta", "gamma", "alpha beta"]
    )
    assert vectors.model == EMBED
    assert [d.index for d in vectors.data] == [0, 1, 2]
    first, second, third = (d.embedding for d in vectors.data)
    assert len(first) == 8 and first == third and first != second
    assert math.isclose(math.fsum(v * v for v in first), 1.0, rel_tol=1e-5)
    assert vectors.usage.prompt_tokens == vectors.usage.total_tokens == 2 + 1 + 2  # words
    assert fake.requests()[-1]["body"]["encoding_format"] == "base64"

    floats = plain(fake).embeddings.create(
        model="e", input="alpha beta", encoding_format="float", dimensions=16
    )
    assert len(floats.data[0].embedding) == 16
    eight = plain(fake).embeddings.create(model="e", input="alpha beta", encoding_format="float")
    assert eight.data[0].embedding == pytest.approx(first, rel=1e-6)

    raw = httpx.post(
        f"{fake.openai_base_url}/embeddings",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "e", "input": [[1, 2, 3]], "encoding_format": "base64"},
    ).json()
    decoded = struct.unpack("<8f", base64.b64decode(raw["data"][0]["embedding"]))
    assert len(decoded) == 8 and raw["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_bad_keys_and_urls_are_refused_as_the_providers_refuse_them(fake: UpstreamFake) -> None:
    fake.add_faults({"status": 500})  # refusals take no fault

    with pytest.raises(openai.AuthenticationError) as wrong:
        plain(fake, api_key="not-the-key").chat.completions.create(model="m", messages=ask("x"))
    assert wrong.value.code == "invalid_api_key"
    assert wrong.value.body["type"] == "invalid_request_error"  # type: ignore[index]

    with pytest.raises(openai.AuthenticationError) as azure_wrong:
        azure(fake, api_key="not-the-key").chat.completions.create(model=CHAT, messages=ask("x"))
    assert azure_wrong.value.code == "401"
    assert "invalid subscription key" in azure_wrong.value.message

    with pytest.raises(openai.NotFoundError) as unknown:
        azure(fake).chat.completions.create(model="no-such-deployment", messages=ask("x"))
    assert unknown.value.code == "DeploymentNotFound"

    url = f"{fake.azure_endpoint}/openai/deployments/{CHAT}/chat/completions"
    body = {"messages": ask("x")}
    no_version = httpx.post(url, headers={"api-key": KEY}, json=body)
    assert no_version.status_code == 404
    assert no_version.json() == {"error": {"code": "404", "message": "Resource not found"}}
    bearer = httpx.post(
        url,
        params={"api-version": API_VERSION},
        headers={"Authorization": f"Bearer {KEY}"},
        json=body,
    )
    assert bearer.status_code == 401  # Azure's scheme reads only api-key

    missing = httpx.post(f"{fake.openai_base_url}/chat/completions", json={"model": "m"})
    assert (
        missing.status_code == 401
        and "didn't provide an API key" in missing.json()["error"]["message"]
    )
    nowhere = httpx.post(
        f"{fake.openai_base_url}/nowhere", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert nowhere.status_code == 404
    assert nowhere.json()["error"]["message"] == "Invalid URL (POST /v1/nowhere)"

    assert fake.pending_faults() == [{"status": 500}]
    log = fake.requests()
    assert [e["outcome"] for e in log] == ["refused"] * 7
    assert [e["status"] for e in log] == [401, 401, 404, 404, 401, 401, 404]
    assert log[0]["secrets"]["authorization"] == {"present": True, "matched": False}
    assert log[4]["secrets"]["authorization"] == {"present": True, "matched": True}


def test_a_429_carries_retry_after_and_the_client_honours_it(fake: UpstreamFake) -> None:
    fake.add_faults({"status": 429, "retry_after": 1})
    with pytest.raises(openai.RateLimitError) as limited:
        plain(fake).chat.completions.create(model="m", messages=ask("x"))
    assert limited.value.response.headers["retry-after"] == "1"
    assert limited.value.code == "rate_limit_exceeded"

    fake.add_faults({"status": 429, "retry_after": 1})
    started = time.monotonic()
    reply = azure(fake, max_retries=1).chat.completions.create(model=CHAT, messages=ask("again"))
    assert time.monotonic() - started >= 0.95
    assert reply.choices[0].message.content == "echo: again"
    log = fake.requests()
    assert [(e["status"], e["outcome"]) for e in log] == [
        (429, "fault"),
        (429, "fault"),
        (200, "answered"),
    ]
    assert log[1]["fault"] == {"status": 429, "retry_after": 1}
    assert fake.pending_faults() == []


def test_500_and_503_reach_the_client_as_server_errors(fake: UpstreamFake) -> None:
    fake.add_faults({"status": 500}, {"status": 503}, {"status": 503, "retry_after_ms": 20})
    with pytest.raises(openai.InternalServerError) as failed:
        plain(fake).chat.completions.create(model="m", messages=ask("x"))
    assert failed.value.status_code == 500
    assert failed.value.body["type"] == "server_error"  # type: ignore[index]
    with pytest.raises(openai.InternalServerError) as unavailable:
        azure(fake).embeddings.create(model=EMBED, input="x")
    assert unavailable.value.status_code == 503 and unavailable.value.code == "ServiceUnavailable"
    with pytest.raises(openai.InternalServerError) as later:
        plain(fake).completions.create(model="m", prompt="x")
    assert later.value.response.headers["retry-after-ms"] == "20"
    assert plain(fake).completions.create(model="m", prompt="x").choices[0].text == "echo: x"


def test_a_slow_first_byte_times_the_client_out_or_delays_it(fake: UpstreamFake) -> None:
    fake.add_faults({"first_byte_delay_s": 1.5}, {"first_byte_delay_s": 0.4})
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        plain(fake, timeout=0.3).chat.completions.create(model="m", messages=ask("x"))
    assert time.monotonic() - started < 1.2

    started = time.monotonic()
    chunks = list(azure(fake).chat.completions.create(model=CHAT, messages=ask("x"), stream=True))
    assert time.monotonic() - started >= 0.4
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: x"


def test_a_stream_cut_mid_way_fails_the_client_without_done(fake: UpstreamFake) -> None:
    fake.add_faults({"cut_after_chunks": 3})
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in azure(fake).chat.completions.create(
            model=CHAT, messages=ask("one two three four"), stream=True
        ):
            received.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(received) == "echo:"  # filter chunk, role, "echo:", then the cut
    assert fake.requests()[-1]["outcome"] == "cut"

    # Raw: three data events, then the connection ends mid-body.
    fake.add_faults({"cut_after_chunks": 2})
    seen: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream(
            "POST",
            f"{fake.openai_base_url}/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": "m", "messages": ask("a b c"), "stream": True},
        ) as response,
    ):
        seen.extend(line for line in response.iter_lines() if line)
    assert len(seen) == 2 and "[DONE]" not in "".join(seen)

    # A non-streamed answer is cut in its body.
    fake.add_faults({"cut_after_chunks": 0})
    with pytest.raises(openai.APIConnectionError):
        plain(fake).chat.completions.create(model="m", messages=ask("x"))
    assert plain(fake).chat.completions.create(model="m", messages=ask("x")).choices


def test_a_stalled_stream_times_the_client_out_after_its_chunks(fake: UpstreamFake) -> None:
    fake.add_faults({"stall_after_chunks": 2})
    received: list[str] = []
    with pytest.raises(openai.APITimeoutError):
        for chunk in plain(fake, timeout=0.5).chat.completions.create(
            model="m", messages=ask("a b"), stream=True
        ):
            received.extend(c.delta.content or "" for c in chunk.choices)
    assert received == ["", "echo:"]
    deadline = time.monotonic() + 5
    while fake.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)  # the fake notices that the client went
    assert fake.stats()["in_flight"] == 0
    assert fake.requests()[-1]["outcome"] == "stalled"

    # A non-streamed answer stalls halfway through its body.
    fake.add_faults({"stall_after_chunks": 0})
    with pytest.raises(openai.APITimeoutError):
        azure(fake, timeout=0.5).embeddings.create(model=EMBED, input="x")
    assert fake.requests()[-1]["outcome"] == "stalled"


def test_no_usage_leaves_usage_out_everywhere(fake: UpstreamFake) -> None:
    fake.add_faults({"no_usage": True}, {"no_usage": True}, {"no_usage": True})
    reply = plain(fake).chat.completions.create(model="m", messages=ask("x"))
    assert reply.usage is None and reply.choices[0].message.content == "echo: x"

    chunks = list(
        azure(fake).chat.completions.create(
            model=CHAT, messages=ask("x"), stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason == "stop"

    vectors = plain(fake).embeddings.create(model="e", input="x")
    assert vectors.data and getattr(vectors, "usage", None) is None


def test_report_faults_replace_the_counts_in_the_usage(fake: UpstreamFake) -> None:
    """A provider under-reporting: the answer is the same, the usage says what was told."""
    lie = {"report_prompt_tokens": 1, "report_completion_tokens": 1}
    text = "one two three four five six"
    truth = plain(fake).chat.completions.create(model="m", messages=ask(text)).usage
    assert truth is not None and truth.completion_tokens == 7
    fake.add_faults(lie, lie, {"report_completion_tokens": 70})
    reply = plain(fake).chat.completions.create(model="m", messages=ask(text))
    assert reply.choices[0].message.content == f"echo: {text}"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (1, 1)
    assert reply.usage.total_tokens == 2

    chunks = list(
        azure(fake).chat.completions.create(
            model=CHAT, messages=ask(text), stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        f"echo: {text}"
    )
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (1, 1)

    only_out = plain(fake).chat.completions.create(model="m", messages=ask(text))
    assert only_out.usage is not None
    assert (only_out.usage.prompt_tokens, only_out.usage.completion_tokens) == (
        truth.prompt_tokens,
        70,
    )
    for wrong in ({"report_prompt_tokens": -1}, {"report_completion_tokens": "1"}):
        with pytest.raises(ValueError, match="refused"):
            fake.add_faults(wrong)


def test_a_content_filter_refusal_is_azures_documented_error(fake: UpstreamFake) -> None:
    fake.add_faults({"content_filter": True}, {"content_filter": True})
    with pytest.raises(openai.BadRequestError) as filtered:
        azure(fake).chat.completions.create(model=CHAT, messages=ask("x"), stream=True)
    error = filtered.value
    assert error.status_code == 400 and error.code == "content_filter"
    assert error.param == "prompt"
    body: dict[str, Any] = error.body  # type: ignore[assignment]
    assert body["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    assert body["innererror"]["content_filter_result"]["violence"] == {
        "filtered": True,
        "severity": "medium",
    }
    with pytest.raises(openai.BadRequestError) as too:
        plain(fake).chat.completions.create(model="m", messages=ask("x"))
    assert too.value.code == "content_filter"


def test_a_hung_request_times_the_client_out_and_the_fake_serves_on(fake: UpstreamFake) -> None:
    fake.add_faults({"hang": True})
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        azure(fake, timeout=0.5).embeddings.create(model=EMBED, input="x")
    assert time.monotonic() - started < 3
    assert azure(fake).embeddings.create(model=EMBED, input="x").data
    hung, served = fake.requests()
    assert (hung["outcome"], hung["status"], hung["fault"]) == ("hung", None, {"hang": True})
    assert served["outcome"] == "answered"


def test_faults_are_taken_in_order_and_checked_when_queued(fake: UpstreamFake) -> None:
    assert fake.add_faults({"status": 500}) == 1
    assert fake.add_faults({"no_usage": True}, {"status": 429, "retry_after": 2}) == 3
    client = plain(fake)
    with pytest.raises(openai.InternalServerError):
        client.embeddings.create(model="e", input="x")
    assert client.embeddings.create(model="e", input="x").usage is None
    with pytest.raises(openai.RateLimitError):
        client.embeddings.create(model="e", input="x")
    assert client.embeddings.create(model="e", input="x").usage is not None

    for wrong in ({"stauts": 500}, {"status": 200}, {"hang": 1}, {"first_byte_delay_s": -1}):
        with pytest.raises(ValueError, match="refused"):
            fake.add_faults(wrong)
    fake.add_faults({"status": 500})
    fake.reset()
    assert fake.pending_faults() == [] and fake.requests() == []


def test_the_request_log_keeps_the_last_thousand_and_reads_from_a_seq(fake: UpstreamFake) -> None:
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}) as client:
        for n in range(1005):
            client.post(f"{fake.openai_base_url}/embeddings", json={"model": "e", "input": str(n)})
    log = fake.requests()
    assert len(log) == 1000
    assert log[0]["seq"] == 6 and log[-1]["seq"] == 1005
    assert log[0]["body"]["input"] == "5"
    assert [e["seq"] for e in fake.requests(since=1003)] == [1004, 1005]
    assert fake.stats()["requests"] == 1005


def test_latency_delays_every_answer_and_concurrent_requests_overlap(fake: UpstreamFake) -> None:
    fake.set_latency(300)
    client = plain(fake)
    elapsed: list[float] = []

    def one() -> None:
        started = time.monotonic()
        client.chat.completions.create(model="m", messages=ask("x"))
        elapsed.append(time.monotonic() - started)

    threads = [threading.Thread(target=one) for _ in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(elapsed) == 8 and min(elapsed) >= 0.3
    assert time.monotonic() - started < 8 * 0.3  # they waited side by side
    assert fake.stats()["max_in_flight"] >= 2


def test_a_latency_spread_is_bounded_by_the_latency(fake: UpstreamFake) -> None:
    assert fake._call("POST", "config", {"latency_ms": 40, "latency_spread_ms": 20}) == {
        "latency_ms": 40.0,
        "latency_spread_ms": 20.0,
    }
    with pytest.raises(ValueError, match="at most latency_ms"):
        fake.set_latency(10, spread_ms=20)
    with pytest.raises(ValueError, match="numbers >= 0"):
        fake._call("POST", "config", {"latency_ms": 10, "latency_spread_ms": -1})
    fake.set_latency(0)
    reply = plain(fake).chat.completions.create(model="m", messages=ask("spread"))
    assert reply.choices[0].message.content == "echo: spread"


def test_the_session_fixture_serves_with_the_default_key(upstream_fake: UpstreamFake) -> None:
    reply = openai.OpenAI(
        base_url=upstream_fake.openai_base_url, api_key="upstream-fake-key", max_retries=0
    ).chat.completions.create(model="m", messages=ask("fixture"))
    assert reply.choices[0].message.content == "echo: fixture"
    assert len(upstream_fake.requests()) == 1


def test_stop_ends_the_process(tmp_path: Any) -> None:
    fake = UpstreamFake(log_dir=tmp_path).start()
    pid, url = fake.pid, fake.base_url
    fake.add_faults({"hang": True})

    def wait_for_answer() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the server goes away, as it should
            httpx.post(
                f"{url}/v1/embeddings",
                headers={"Authorization": "Bearer upstream-fake-key"},
                json={"model": "e", "input": "x"},
                timeout=30,
            )

    hung = threading.Thread(target=wait_for_answer, daemon=True)
    hung.start()
    time.sleep(0.3)
    started = time.monotonic()
    process = fake.process
    fake.stop()
    assert time.monotonic() - started < 10  # a hung request does not hold the stop up
    assert process.popen.returncode is not None and not process.alive()
    assert pid > 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/_control/health")
