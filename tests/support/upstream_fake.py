"""A fake upstream provider on loopback: OpenAI's and Azure OpenAI's HTTP APIs, deterministic
answers, and faults injected on command. The relay's tests and its benchmark run it as a real
server in a process of its own (`python -m tests.support.upstream_fake --port N`), started and
stopped by `UpstreamFake`.

What it serves, in the providers' wire shapes:

- Azure scheme: ``POST /openai/deployments/{deployment}/chat/completions``, ``.../completions``
  and ``.../embeddings``. The ``api-version`` query parameter is required (missing: 404
  ``Resource not found``, as Azure answers; outside ``--api-versions`` when that is given: 400
  ``API version not supported``), then the ``api-key`` header must equal the key (else 401 in
  Azure's error shape), then the deployment must be one of ``--deployments`` when given (else
  404 ``DeploymentNotFound``). Answers name the deployment as their ``model`` and, unless
  ``--no-azure-filter-results``, carry Azure's content-filter annotations: a streamed answer
  then begins with Azure's chunk of ``prompt_filter_results`` and empty ``choices``.
- OpenAI scheme: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` with
  ``Authorization: Bearer <key>`` (else 401 in OpenAI's shape, code ``invalid_api_key``);
  answers name the request's ``model``.

The answers, deterministic:

- Chat: ``"echo: " + <the last user message's text>``, cut to ``max_completion_tokens`` (or
  ``max_tokens``) words, ``finish_reason`` ``length`` when cut, else ``stop``. Completions:
  the same for the prompt (a list of strings is read as one text, joined by spaces). ``n`` is
  not honoured: one choice.
- Tokens are whitespace-separated words: ``prompt_tokens`` counts the words of every message's
  text (chat) or of the prompt (completions), ``completion_tokens`` the words of the answer
  (``echo:`` included), ``total_tokens`` the sum. An embeddings input counts its words (a list
  of token ids counts its length); embeddings usage has ``prompt_tokens`` and ``total_tokens``.
- Streaming (``stream: true``) is SSE, ``data: {json}\\n\\n`` per chunk: Azure's filter chunk
  (Azure scheme, annotations on), a chunk with the assistant's role and empty content (chat),
  one chunk per word (the first word bare, later ones with a leading space, so the pieces
  concatenate to the answer), a chunk with the ``finish_reason``, then, when
  ``stream_options.include_usage`` is true, the chunk with empty ``choices`` and ``usage``
  (every earlier chunk then carries ``"usage": null``), then ``data: [DONE]``.
- Embeddings: a unit vector per input, derived from SHA-256 of the input's text, of
  ``dimensions`` (default ``--embedding-dim``, 8) floats; ``encoding_format: base64`` (what the
  openai package asks for by default) gives little-endian float32 in base64.

Faults, queued by ``POST /_control/faults`` with a JSON list of objects, are taken one per API
request in arrival order; requests the fake refuses before that (unknown path, wrong method,
missing api-version, bad key, unknown deployment, unreadable JSON) take none. An object may
combine these keys:

- ``status`` (400-599): that error in the scheme's shape, with ``retry_after`` (seconds, the
  ``retry-after`` header) and ``retry_after_ms`` (Azure's ``retry-after-ms`` header);
- ``content_filter``: Azure's 400 with code ``content_filter`` and its ``innererror``
  (``ResponsibleAIPolicyViolation`` with ``content_filter_result``), on either scheme;
- ``first_byte_delay_s``: nothing is sent for that long (then the answer, or the error);
- ``chunk_delay_s``: a streamed answer waits that long before each chunk after the first;
- ``cut_after_chunks`` n: a streamed answer sends n ``data:`` chunks (counting every kind),
  then the connection is closed abruptly: no ``[DONE]``, no end of the chunked body;
- ``stall_after_chunks`` n: a streamed answer sends n chunks, then nothing more until the
  client goes. With either, a non-streamed answer (embeddings too) sends its headers and half
  its body, then closes the connection, or waits for the client to go;
- ``no_usage``: no ``usage`` anywhere (no usage chunk even when asked for);
- ``report_prompt_tokens`` / ``report_completion_tokens`` n: the ``usage`` (whole or in the
  usage chunk) reports n prompt (completion) tokens instead of the real count, the total
  their sum: a provider under-reporting (or over-reporting) what it served;
- ``hang``: no answer at all until the client goes.

``--latency-ms`` (or ``POST /_control/config {"latency_ms": n}``) delays the first byte of every
API request the fake does not refuse; with ``"latency_spread_ms": s`` in the same config each
delay is drawn uniformly from n - s to n + s (a real provider's answers do not all take the
same time); nothing else sleeps unless a fault says so.

Control, unauthenticated (loopback only): ``GET /_control/health``; ``POST /_control/faults``
(a list, appended to the queue; answers ``{"pending": n}``), ``GET /_control/faults``;
``POST /_control/reset`` (empties the queue, the request log and the statistics, and
numbers requests from 1 again);
``GET /_control/requests[?since=seq]``: the last 1000 requests to every other path, oldest
first, each ``{"seq", "time", "method", "path", "query", "headers", "secrets", "scheme",
"operation", "deployment", "body", "body_text", "body_bytes", "fault", "status", "outcome"}``.
``headers`` holds every header by lower-case name (repeated ones joined by ", ") except the
secret ones (authorization, api-key, proxy-authorization, x-api-key, cookie), which appear only
in ``secrets`` as ``{"present": bool, "matched": bool}``; ``authorization`` and ``api-key`` are
always there (``matched``: ``Bearer <key>``, or the key itself, for the others the key itself).
``body`` is the parsed JSON (None when unreadable or over 256 KiB; then ``body_text`` holds up
to 4 KiB of it). ``outcome``: ``answered``, ``refused`` (before the fault queue), ``fault``
(an error status from a fault), ``cut``, ``stalled``, ``hung``, or ``pending`` while in flight.
``GET /_control/stats``: ``{"requests", "in_flight", "max_in_flight"}`` (API requests only);
``POST /_control/config``: ``{"latency_ms": n}`` or ``{"latency_ms": n, "latency_spread_ms": s}``
(s at most n; absent: 0).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import logging
import math
import os
import random
import re
import struct
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import pytest

if TYPE_CHECKING:
    from tests.support.stack import Process, Stack

Scope = Mapping[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_KEY = "upstream-fake-key"
KEY_ENV = "UPSTREAM_FAKE_KEY"  # the key reaches the server here, not on its command line
DEFAULT_EMBEDDING_DIM = 8
KEEP_REQUESTS = 1000
MAX_BODY = 16 * 1024 * 1024
LOGGED_BODY = 256 * 1024
LOGGED_TEXT = 4096
SECRET_HEADERS = ("authorization", "api-key", "proxy-authorization", "x-api-key", "cookie")
OPERATIONS = ("chat/completions", "completions", "embeddings")
AZURE_PATH = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|completions|embeddings)$")
OPENAI_PATH = re.compile(r"^/v1/(chat/completions|completions|embeddings)$")

# Fault keys and the types their values may have (bool is checked apart: it is an int).
FAULT_KEYS: dict[str, tuple[type, ...]] = {
    "status": (int,),
    "retry_after": (int, float),
    "retry_after_ms": (int,),
    "content_filter": (bool,),
    "first_byte_delay_s": (int, float),
    "chunk_delay_s": (int, float),
    "cut_after_chunks": (int,),
    "stall_after_chunks": (int,),
    "no_usage": (bool,),
    "report_prompt_tokens": (int,),
    "report_completion_tokens": (int,),
    "hang": (bool,),
}

AZURE_UNAUTHORIZED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide "
    "a valid key for an active subscription and use a correct regional API endpoint for your "
    "resource."
)
AZURE_DEPLOYMENT_NOT_FOUND = (
    "The API deployment for this resource does not exist. If you created the deployment within "
    "the last 5 minutes, please wait a moment and try again."
)
CONTENT_FILTERED = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management "
    "policy. Please modify your prompt and retry. To learn more about our content filtering "
    "policies please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766"
)
FILTER_CATEGORIES = ("hate", "self_harm", "sexual", "violence")


class StreamCut(Exception):
    """Raised to make uvicorn close the connection mid-answer (a cut_after_chunks fault)."""


class _QuietCuts(logging.Filter):
    """Keeps uvicorn from logging the cuts the fake makes on purpose as application errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], StreamCut))


@dataclass
class FakeConfig:
    key: str = DEFAULT_KEY
    latency_ms: float = 0.0
    latency_spread_ms: float = 0.0  # each delay uniform in latency_ms +- this
    deployments: frozenset[str] | None = None  # None: any deployment name
    api_versions: frozenset[str] | None = None  # None: any api-version
    embedding_dim: int = DEFAULT_EMBEDDING_DIM
    azure_filter_results: bool = True


class Refused(Exception):
    """A request the fake answers with an error before it takes a fault."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


def validate_faults(faults: Any) -> list[dict[str, Any]]:
    """The fault list, or ValueError naming what is wrong with it."""
    if not isinstance(faults, list):
        raise ValueError("faults must be a JSON list of objects")
    for fault in faults:
        if not isinstance(fault, dict):
            raise ValueError(f"a fault must be an object: {fault!r}")
        for name, value in fault.items():
            types = FAULT_KEYS.get(name)
            if types is None:
                raise ValueError(f"unknown fault key {name!r}; known: {sorted(FAULT_KEYS)}")
            if bool not in types and isinstance(value, bool):
                raise ValueError(f"{name} must be a number, not {value!r}")
            if not isinstance(value, types):
                raise ValueError(f"{name} has the wrong type: {value!r}")
            if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"{name} must not be negative: {value!r}")
        status = fault.get("status")
        if status is not None and not 400 <= status <= 599:
            raise ValueError(f"status must be 400-599: {status}")
    return faults


# -- the answers ---------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return text.split()


def content_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def prompt_text(prompt: Any) -> tuple[str, int]:
    """A completions prompt's text and its token count (words; a list of ids counts its length)."""
    if isinstance(prompt, str):
        return prompt, len(words(prompt))
    if isinstance(prompt, list):
        if all(isinstance(item, int) for item in prompt):
            return "", len(prompt)
        texts = [item for item in prompt if isinstance(item, str)]
        ids = sum(len(item) for item in prompt if isinstance(item, list))
        text = " ".join(texts)
        return text, len(words(text)) + ids
    return "", 0


def max_words(body: Mapping[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def answer(text: str, limit: int | None) -> tuple[list[str], str]:
    """The answer's words for `text`, and its finish_reason."""
    reply = ["echo:", *words(text)]
    if limit is not None and len(reply) > limit:
        return reply[:limit], "length"
    return reply, "stop"


def usage(prompt: int, completion: int, fault: Mapping[str, Any] | None = None) -> dict[str, int]:
    """The usage object; a ``report_*`` fault replaces the real counts."""
    if fault:
        prompt = int(fault.get("report_prompt_tokens", prompt))
        completion = int(fault.get("report_completion_tokens", completion))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def embedding(text: str, dim: int) -> list[float]:
    """A deterministic unit vector for `text`."""
    raw = b""
    block = 0
    seed = text.encode()
    while len(raw) < 4 * dim:
        raw += hashlib.sha256(block.to_bytes(4, "big") + seed).digest()
        block += 1
    values = [(n / 0xFFFFFFFF) * 2 - 1 for n in struct.unpack(f">{dim}I", raw[: 4 * dim])]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def filter_results() -> dict[str, Any]:
    return {name: {"filtered": False, "severity": "safe"} for name in FILTER_CATEGORIES}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


# -- error bodies ---------------------------------------------------------------------------


def openai_error(
    message: str, kind: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def azure_error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def content_filter_error() -> dict[str, Any]:
    results: dict[str, Any] = filter_results()
    results["violence"] = {"filtered": True, "severity": "medium"}
    results["jailbreak"] = {"filtered": False, "detected": False}
    return {
        "error": {
            "message": CONTENT_FILTERED,
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": results,
            },
        }
    }


def fault_error(
    scheme: str, status: int, fault: Mapping[str, Any], api_version: str
) -> dict[str, Any]:
    retry = fault.get("retry_after")
    if scheme == "azure":
        if status == 429:
            wait = f"Please retry after {retry} seconds. " if retry is not None else ""
            return azure_error(
                "429",
                "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version "
                f"{api_version} have exceeded call rate limit of your current OpenAI S0 pricing "
                f"tier. {wait}Please go here: https://aka.ms/oai/quotaincrease if you would like "
                "to further increase the default rate limit.",
            )
        if status >= 500:
            return azure_error(
                "InternalServerError" if status == 500 else "ServiceUnavailable",
                "The service is temporarily unable to process your request. "
                "Please try again later.",
            )
        return azure_error(str(status), "The request was refused by the upstream fake.")
    if status == 429:
        return openai_error(
            "Rate limit reached for requests. Please try again later.",
            "requests",
            "rate_limit_exceeded",
        )
    if status == 500:
        return openai_error(
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
        )
    if status == 503:
        return openai_error(
            "The engine is currently overloaded, please try again later.", "server_error"
        )
    if status >= 500:
        return openai_error("The upstream fake failed on purpose.", "server_error")
    return openai_error("The request was refused by the upstream fake.", "invalid_request_error")


# -- the application ------------------------------------------------------------------------


@dataclass
class Route:
    scheme: str  # "azure" or "openai"
    operation: str  # one of OPERATIONS
    deployment: str | None


class UpstreamApp:
    """The ASGI application. One process, one event loop: its state needs no lock."""

    def __init__(self, config: FakeConfig) -> None:
        self.config = config
        self.faults: deque[dict[str, Any]] = deque()
        self.log: deque[dict[str, Any]] = deque(maxlen=KEEP_REQUESTS)
        self.seq = 0
        self.total = 0
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if path.startswith("/_control/"):
            await self._control(scope, receive, send)
            return
        self.total += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self._api(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- control --------------------------------------------------------------------------

    async def _control(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        name = scope["path"].removeprefix("/_control/")
        raw = await read_body(receive, MAX_BODY)
        if (method, name) == ("GET", "health"):
            await send_json(send, 200, {"ok": True})
        elif (method, name) == ("GET", "requests"):
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            since = int(query.get("since", "0") or 0)
            await send_json(send, 200, [e for e in self.log if e["seq"] > since])
        elif (method, name) == ("GET", "faults"):
            await send_json(send, 200, {"pending": list(self.faults)})
        elif (method, name) == ("POST", "faults"):
            try:
                faults = validate_faults(json.loads(raw or b"null"))
            except ValueError as exc:  # json.JSONDecodeError is a ValueError
                await send_json(send, 400, {"error": str(exc)})
                return
            self.faults.extend(faults)
            await send_json(send, 200, {"pending": len(self.faults)})
        elif (method, name) == ("POST", "reset"):
            self.faults.clear()
            self.log.clear()
            self.seq = 0
            self.total = 0
            self.max_in_flight = self.in_flight
            await send_json(send, 200, {"ok": True})
        elif (method, name) == ("GET", "stats"):
            stats = {
                "requests": self.total,
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
            }
            await send_json(send, 200, stats)
        elif (method, name) == ("POST", "config"):
            try:
                change = json.loads(raw or b"{}")
                latency = change["latency_ms"]
                spread = change.get("latency_spread_ms", 0)
                for value in (latency, spread):
                    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                        raise ValueError("latency_ms and latency_spread_ms must be numbers >= 0")
                if spread > latency:
                    raise ValueError("latency_spread_ms must be at most latency_ms")
            except (ValueError, KeyError, TypeError) as exc:
                await send_json(send, 400, {"error": f"expected {{'latency_ms': n}}: {exc}"})
                return
            self.config.latency_ms = float(latency)
            self.config.latency_spread_ms = float(spread)
            await send_json(
                send,
                200,
                {
                    "latency_ms": self.config.latency_ms,
                    "latency_spread_ms": self.config.latency_spread_ms,
                },
            )
        else:
            await send_json(send, 404, {"error": f"no control {method} {name}"})

    # -- the API --------------------------------------------------------------------------

    def _record(self, scope: Scope, raw: bytes) -> dict[str, Any]:
        headers: dict[str, str] = {}
        secret_values: dict[str, str] = {}
        for name_b, value_b in scope["headers"]:
            name = name_b.decode("latin-1").lower()
            value = value_b.decode("latin-1")
            target = secret_values if name in SECRET_HEADERS else headers
            target[name] = f"{target[name]}, {value}" if name in target else value
        key = self.config.key
        secrets = {
            name: {
                "present": name in secret_values,
                "matched": secret_values.get(name)
                == (f"Bearer {key}" if name == "authorization" else key),
            }
            for name in SECRET_HEADERS
            if name in secret_values or name in ("authorization", "api-key")
        }
        body: Any = None
        text: str | None = None
        if len(raw) <= LOGGED_BODY:
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                text = raw[:LOGGED_TEXT].decode("utf-8", "replace")
        else:
            text = raw[:LOGGED_TEXT].decode("utf-8", "replace")
        self.seq += 1
        entry: dict[str, Any] = {
            "seq": self.seq,
            "time": time.time(),
            "method": scope["method"],
            "path": scope["path"],
            "query": dict(
                parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
            ),
            "headers": headers,
            "secrets": secrets,
            "scheme": None,
            "operation": None,
            "deployment": None,
            "body": body,
            "body_text": text,
            "body_bytes": len(raw),
            "fault": None,
            "status": None,
            "outcome": "pending",
        }
        self.log.append(entry)
        return entry

    def _route(
        self, scope: Scope, entry: dict[str, Any], raw: bytes
    ) -> tuple[Route, dict[str, Any]]:
        """The route and the JSON body of a request the fake accepts, else Refused."""
        path: str = scope["path"]
        method: str = scope["method"]
        azure = AZURE_PATH.match(path)
        plain = OPENAI_PATH.match(path)
        header = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if azure is not None:
            route = Route("azure", azure.group(2), azure.group(1))
            entry.update(scheme="azure", operation=route.operation, deployment=route.deployment)
            if method != "POST":
                raise Refused(405, azure_error("405", "Method not allowed"))
            version = entry["query"].get("api-version")
            if not version:
                raise Refused(404, azure_error("404", "Resource not found"))
            if self.config.api_versions is not None and version not in self.config.api_versions:
                raise Refused(400, azure_error("BadRequest", "API version not supported"))
            if header.get("api-key") != self.config.key:
                raise Refused(401, azure_error("401", AZURE_UNAUTHORIZED))
            if (
                self.config.deployments is not None
                and route.deployment not in self.config.deployments
            ):
                raise Refused(404, azure_error("DeploymentNotFound", AZURE_DEPLOYMENT_NOT_FOUND))
        elif plain is not None:
            route = Route("openai", plain.group(1), None)
            entry.update(scheme="openai", operation=route.operation)
            if method != "POST":
                raise Refused(
                    405,
                    openai_error(
                        f"Invalid method for URL ({method} {path})", "invalid_request_error"
                    ),
                )
            auth = header.get("authorization")
            if auth is None:
                raise Refused(
                    401,
                    openai_error(
                        "You didn't provide an API key. You need to provide your API key in an "
                        "Authorization header using Bearer auth "
                        "(i.e. Authorization: Bearer YOUR_KEY).",
                        "invalid_request_error",
                    ),
                )
            if auth != f"Bearer {self.config.key}":
                raise Refused(
                    401,
                    openai_error(
                        "Incorrect API key provided.",
                        "invalid_request_error",
                        "invalid_api_key",
                    ),
                )
        elif path.startswith("/openai/"):
            raise Refused(404, azure_error("404", "Resource not found"))
        else:
            raise Refused(
                404, openai_error(f"Invalid URL ({method} {path})", "invalid_request_error")
            )
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise Refused(
                400,
                self._bad_request(
                    route,
                    "We could not parse the JSON body of your request. (HINT: This likely means "
                    "you aren't using your HTTP library correctly.)",
                ),
            )
        if route.scheme == "openai" and not isinstance(body.get("model"), str):
            raise Refused(
                400, self._bad_request(route, "you must provide a model parameter", "model")
            )
        required = {"chat/completions": "messages", "completions": "prompt", "embeddings": "input"}[
            route.operation
        ]
        if required not in body:
            raise Refused(
                400, self._bad_request(route, f"'{required}' is a required property", required)
            )
        return route, body

    @staticmethod
    def _bad_request(route: Route, message: str, param: str | None = None) -> dict[str, Any]:
        if route.scheme == "azure":
            return azure_error("BadRequest", message)
        return openai_error(message, "invalid_request_error", None, param)

    async def _api(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = await read_body(receive, MAX_BODY)
        entry = self._record(scope, raw)
        try:
            route, body = self._route(scope, entry, raw)
        except Refused as refused:
            entry.update(status=refused.status, outcome="refused")
            await send_json(send, refused.status, refused.body, request_headers(entry))
            return
        fault = self.faults.popleft() if self.faults else {}
        entry["fault"] = fault or None
        latency_ms = self.config.latency_ms
        if self.config.latency_spread_ms:
            spread = self.config.latency_spread_ms
            latency_ms += random.uniform(-spread, spread)
        delay = latency_ms / 1000 + float(fault.get("first_byte_delay_s", 0))
        if fault.get("hang"):
            entry["outcome"] = "hung"
            await wait_disconnect(receive)
            return
        if delay > 0:
            await asyncio.sleep(delay)
        headers = request_headers(entry)
        if fault.get("content_filter"):
            entry.update(status=400, outcome="fault")
            await send_json(send, 400, content_filter_error(), headers)
            return
        status = fault.get("status")
        if status is not None:
            if "retry_after" in fault:
                headers.append((b"retry-after", str(fault["retry_after"]).encode()))
            if "retry_after_ms" in fault:
                headers.append((b"retry-after-ms", str(fault["retry_after_ms"]).encode()))
            entry.update(status=status, outcome="fault")
            version = entry["query"].get("api-version", "")
            await send_json(
                send, status, fault_error(route.scheme, status, fault, version), headers
            )
            return
        model = route.deployment if route.deployment is not None else str(body["model"])
        entry["status"] = 200
        if route.operation == "embeddings":
            await self._embeddings(body, model, fault, entry, receive, send, headers)
        elif body.get("stream") is True:
            await self._stream(route, body, model, fault, entry, receive, send, headers)
        else:
            await self._complete(route, body, model, fault, entry, receive, send, headers)

    def _texts(self, route: Route, body: Mapping[str, Any]) -> tuple[str, int]:
        """The text to answer and the prompt's token count."""
        if route.operation == "chat/completions":
            messages = body.get("messages")
            messages = messages if isinstance(messages, list) else []
            prompt = sum(
                len(words(content_text(m.get("content")))) for m in messages if isinstance(m, dict)
            )
            users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
            return (content_text(users[-1].get("content")) if users else ""), prompt
        return prompt_text(body.get("prompt"))

    async def _complete(
        self,
        route: Route,
        body: Mapping[str, Any],
        model: str,
        fault: Mapping[str, Any],
        entry: dict[str, Any],
        receive: Receive,
        send: Send,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        text, prompt = self._texts(route, body)
        reply, finish = answer(text, max_words(body))
        azure_notes = route.scheme == "azure" and self.config.azure_filter_results
        choice: dict[str, Any]
        if route.operation == "chat/completions":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(reply), "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
            result: dict[str, Any] = {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
            }
        else:
            choice = {
                "text": " ".join(reply),
                "index": 0,
                "logprobs": None,
                "finish_reason": finish,
            }
            result = {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
            }
        if azure_notes:
            choice["content_filter_results"] = filter_results()
            result["prompt_filter_results"] = [
                {"prompt_index": 0, "content_filter_results": filter_results()}
            ]
        if not fault.get("no_usage"):
            result["usage"] = usage(prompt, len(reply), fault)
        await send_whole(dumps(result), fault, entry, receive, send, headers)

    async def _stream(
        self,
        route: Route,
        body: Mapping[str, Any],
        model: str,
        fault: Mapping[str, Any],
        entry: dict[str, Any],
        receive: Receive,
        send: Send,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        text, prompt = self._texts(route, body)
        reply, finish = answer(text, max_words(body))
        options = body.get("stream_options")
        with_usage = (
            isinstance(options, dict)
            and options.get("include_usage") is True
            and not fault.get("no_usage")
        )
        azure_notes = route.scheme == "azure" and self.config.azure_filter_results
        chat = route.operation == "chat/completions"
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }

        def chunk(
            piece: str | None, finish_reason: str | None, role: bool = False
        ) -> dict[str, Any]:
            choice: dict[str, Any]
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta = {"role": "assistant", "content": "", "refusal": None}
                elif piece is not None:
                    delta = {"content": piece}
                choice = {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            else:
                choice = {
                    "text": piece or "",
                    "index": 0,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            if azure_notes and not role:
                choice["content_filter_results"] = filter_results() if piece else {}
            event: dict[str, Any] = {**head, "choices": [choice]}
            if with_usage:
                event["usage"] = None
            return event

        events: list[bytes] = []
        if azure_notes:
            events.append(
                sse(
                    {
                        "choices": [],
                        "created": 0,
                        "id": "",
                        "model": "",
                        "object": "",
                        "prompt_filter_results": [
                            {"prompt_index": 0, "content_filter_results": filter_results()}
                        ],
                    }
                )
            )
        if chat:
            events.append(sse(chunk(None, None, role=True)))
        events.extend(
            sse(chunk(word if i == 0 else f" {word}", None)) for i, word in enumerate(reply)
        )
        events.append(sse(chunk(None, finish)))
        if with_usage:
            events.append(sse({**head, "choices": [], "usage": usage(prompt, len(reply), fault)}))
        cut = fault.get("cut_after_chunks")
        stall = fault.get("stall_after_chunks")
        pause = float(fault.get("chunk_delay_s", 0))
        await send_start(send, 200, "text/event-stream; charset=utf-8", headers, None)
        for sent, event in enumerate(events):
            if cut is not None and sent >= cut:
                entry["outcome"] = "cut"
                raise StreamCut
            if stall is not None and sent >= stall:
                entry["outcome"] = "stalled"
                await wait_disconnect(receive)
                return
            if pause > 0 and sent > 0:
                await asyncio.sleep(pause)
            await send({"type": "http.response.body", "body": event, "more_body": True})
        if cut is not None:
            entry["outcome"] = "cut"
            raise StreamCut
        if stall is not None:
            entry["outcome"] = "stalled"
            await wait_disconnect(receive)
            return
        entry["outcome"] = "answered"
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    async def _embeddings(
        self,
        body: Mapping[str, Any],
        model: str,
        fault: Mapping[str, Any],
        entry: dict[str, Any],
        receive: Receive,
        send: Send,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        given = body.get("input")
        if isinstance(given, str) or (
            isinstance(given, list) and given and all(isinstance(i, int) for i in given)
        ):
            inputs: list[Any] = [given]
        else:
            inputs = given if isinstance(given, list) else []
        dim = body.get("dimensions")
        dim = (
            dim
            if isinstance(dim, int) and not isinstance(dim, bool) and 0 < dim <= 4096
            else self.config.embedding_dim
        )
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        tokens = 0
        for index, item in enumerate(inputs):
            if isinstance(item, str):
                text, count = item, len(words(item))
            else:
                ids = item if isinstance(item, list) else []
                text, count = " ".join(str(i) for i in ids), len(ids)
            tokens += count
            vector = embedding(text, dim)
            value: Any = (
                base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode() if as_base64 else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": value})
        result: dict[str, Any] = {"object": "list", "data": data, "model": model}
        if not fault.get("no_usage"):
            result["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        await send_whole(dumps(result), fault, entry, receive, send, headers)


async def send_whole(
    payload: bytes,
    fault: Mapping[str, Any],
    entry: dict[str, Any],
    receive: Receive,
    send: Send,
    headers: list[tuple[bytes, bytes]],
) -> None:
    """A non-streamed answer; cut_after_chunks and stall_after_chunks send its headers (with
    the whole length) and half its body, then close the connection, or wait for the client
    to go."""
    await send_start(send, 200, "application/json", headers, len(payload))
    if "cut_after_chunks" in fault or "stall_after_chunks" in fault:
        half = {"type": "http.response.body", "body": payload[: len(payload) // 2]}
        await send({**half, "more_body": True})
        if "cut_after_chunks" in fault:
            entry["outcome"] = "cut"
            raise StreamCut
        entry["outcome"] = "stalled"
        await wait_disconnect(receive)
        return
    entry["outcome"] = "answered"
    await send({"type": "http.response.body", "body": payload})


def request_headers(entry: Mapping[str, Any]) -> list[tuple[bytes, bytes]]:
    request_id = f"req_{entry['seq']:08d}"
    headers = [(b"x-request-id", request_id.encode())]
    if entry["scheme"] == "azure":
        headers.append((b"apim-request-id", str(uuid.uuid4()).encode()))
    return headers


async def read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        part: bytes = message.get("body", b"")
        size += len(part)
        if size <= limit:
            chunks.append(part)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def send_start(
    send: Send,
    status: int,
    content_type: str,
    headers: list[tuple[bytes, bytes]],
    length: int | None,
) -> None:
    out = [(b"content-type", content_type.encode()), *headers]
    if length is not None:
        out.append((b"content-length", str(length).encode()))
    else:
        out.append((b"cache-control", b"no-cache"))
    await send({"type": "http.response.start", "status": status, "headers": out})


async def send_json(
    send: Send, status: int, obj: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = dumps(obj)
    await send_start(send, status, "application/json", headers or [], len(payload))
    await send({"type": "http.response.body", "body": payload})


# -- the process ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.upstream_fake",
        description="A fake OpenAI / Azure OpenAI upstream with faults on command.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--key",
        default=os.environ.get(KEY_ENV, DEFAULT_KEY),
        help=f"the key both schemes require (default: ${KEY_ENV}, else {DEFAULT_KEY!r})",
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="delay before every answer")
    parser.add_argument("--deployments", default=None, help="comma-separated; default: any name")
    parser.add_argument("--api-versions", default=None, help="comma-separated; default: any")
    parser.add_argument("--embedding-dim", type=int, default=DEFAULT_EMBEDDING_DIM)
    parser.add_argument(
        "--no-azure-filter-results",
        action="store_true",
        help="leave out Azure's content-filter annotations (and its first streamed chunk)",
    )
    parser.add_argument("--log-level", default="warning")
    return parser.parse_args(argv)


def split_names(value: str | None) -> frozenset[str] | None:
    if value is None:
        return None
    return frozenset(name.strip() for name in value.split(",") if name.strip())


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    app = UpstreamApp(
        FakeConfig(
            key=args.key,
            latency_ms=args.latency_ms,
            deployments=split_names(args.deployments),
            api_versions=split_names(args.api_versions),
            embedding_dim=args.embedding_dim,
            azure_filter_results=not args.no_azure_filter_results,
        )
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=1,
        backlog=4096,
    )
    logging.getLogger("uvicorn.error").addFilter(_QuietCuts())
    uvicorn.Server(config).run()


# -- the test-side helper -------------------------------------------------------------------


class UpstreamFake:
    """The fake as a process of this test (or benchmark), started on a free loopback port and
    stopped by its own pid.

        with UpstreamFake(key="k") as fake:
            client = openai.AzureOpenAI(azure_endpoint=fake.azure_endpoint, api_key="k",
                                        api_version="2024-10-21")
            fake.add_faults({"status": 429, "retry_after": 1}, {"cut_after_chunks": 2})
            ...
            fake.requests()  # what arrived, as GET /_control/requests
    """

    def __init__(
        self,
        *,
        key: str = DEFAULT_KEY,
        latency_ms: float = 0.0,
        deployments: Sequence[str] | None = None,
        api_versions: Sequence[str] | None = None,
        embedding_dim: int = DEFAULT_EMBEDDING_DIM,
        azure_filter_results: bool = True,
        name: str = "upstream-fake",
        log_dir: Path | None = None,
    ) -> None:
        self.key = key
        self.latency_ms = latency_ms
        self.deployments = deployments
        self.api_versions = api_versions
        self.embedding_dim = embedding_dim
        self.azure_filter_results = azure_filter_results
        self.name = name
        self.log_dir = log_dir
        self.port = 0
        self._stack: Stack | None = None
        self._process: Process | None = None

    # where it is

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:<port>: Azure's resource endpoint (azure_endpoint=)."""
        if not self.port:
            raise RuntimeError("the upstream fake is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def azure_endpoint(self) -> str:
        return self.base_url

    @property
    def openai_base_url(self) -> str:
        """The OpenAI scheme's base URL (base_url= of openai.OpenAI): <base_url>/v1."""
        return f"{self.base_url}/v1"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the upstream fake is not started")
        return self._process.popen.pid

    @property
    def process(self) -> Process:
        if self._process is None:
            raise RuntimeError("the upstream fake is not started")
        return self._process

    # its life

    def argv(self, port: int) -> list[str]:
        import sys

        argv = [sys.executable, "-m", "tests.support.upstream_fake", "--port", str(port)]
        argv += ["--latency-ms", str(self.latency_ms), "--embedding-dim", str(self.embedding_dim)]
        if self.deployments is not None:
            argv += ["--deployments", ",".join(self.deployments)]
        if self.api_versions is not None:
            argv += ["--api-versions", ",".join(self.api_versions)]
        if not self.azure_filter_results:
            argv.append("--no-azure-filter-results")
        return argv

    def start(self, timeout: float = 30.0) -> UpstreamFake:
        """Starts it on a free port and waits until it answers; tries other ports when the one
        picked was taken in between."""
        from tests.support.stack import LOG_DIR, PYTHONPATH, Stack, free_port

        if self._process is not None:
            raise RuntimeError("the upstream fake is already started")
        log_dir = self.log_dir or LOG_DIR
        log_dir.mkdir(parents=True, exist_ok=True)
        stack = Stack(
            env={**os.environ, "PYTHONPATH": PYTHONPATH, KEY_ENV: self.key}, log_dir=log_dir
        )
        self._stack = stack
        failure = ""
        for _ in range(3):
            port = free_port()
            proc = stack.spawn(f"{self.name}-{port}", self.argv(port))
            self._process, self.port = proc, port
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.alive():
                try:
                    self._call("GET", "health", timeout=1)
                    return self
                except OSError:
                    time.sleep(0.05)
            failure = proc.tail()
            stack.stop(proc)
            self._process, self.port = None, 0
        raise RuntimeError(f"the upstream fake did not start:\n{failure}")

    def stop(self) -> None:
        """Stops its process (SIGTERM to its own process group, SIGKILL if it lingers); its log
        (<log_dir>/<name>-<port>.log) stays only when it wrote something."""
        if self._stack is not None and self._process is not None:
            self._stack.stop(self._process)
            log = self._process.log
            if log.exists() and log.stat().st_size == 0:
                log.unlink()
        self._process = None
        self.port = 0

    def __enter__(self) -> UpstreamFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # its control

    def _call(self, method: str, name: str, payload: Any = None, timeout: float = 10) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(  # noqa: S310 - loopback, http by design
            f"{self.base_url}/_control/{name}",
            data=data,
            method=method,
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310
                return json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise ValueError(
                f"the upstream fake refused {method} /_control/{name}: {detail}"
            ) from exc

    def add_faults(self, *faults: Mapping[str, Any]) -> int:
        """Queues faults, taken one per API request in order; the number now queued."""
        pending: int = self._call("POST", "faults", [dict(f) for f in faults])["pending"]
        return pending

    def pending_faults(self) -> list[dict[str, Any]]:
        pending: list[dict[str, Any]] = self._call("GET", "faults")["pending"]
        return pending

    def reset(self) -> None:
        """Empties the fault queue, the request log and the statistics."""
        self._call("POST", "reset", {})

    def requests(self, since: int = 0) -> list[dict[str, Any]]:
        """The requests received (the last 1000), oldest first; those after seq `since`."""
        entries: list[dict[str, Any]] = self._call("GET", f"requests?since={since}")
        return entries

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = self._call("GET", "stats")
        return stats

    def set_latency(self, latency_ms: float, spread_ms: float = 0.0) -> None:
        self._call("POST", "config", {"latency_ms": latency_ms, "latency_spread_ms": spread_ms})
        self.latency_ms = latency_ms


# Fixtures by name (`upstream_fake`, `upstream_fake_server`): a test module imports the two
# functions (or a conftest lists this module in pytest_plugins) and asks for the names.
@pytest.fixture(name="upstream_fake_server", scope="session")
def upstream_fake_server_fixture() -> Iterator[UpstreamFake]:
    """One fake for the session (key DEFAULT_KEY); use `upstream_fake` for a clean one."""
    fake = UpstreamFake().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(name="upstream_fake")
def upstream_fake_fixture(upstream_fake_server: UpstreamFake) -> UpstreamFake:
    """The session's fake with no fault queued, nothing logged, no added latency."""
    upstream_fake_server.reset()
    if upstream_fake_server.latency_ms:
        upstream_fake_server.set_latency(0)
    return upstream_fake_server


if __name__ == "__main__":
    main()
