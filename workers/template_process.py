"""Chat templates rendered in child processes that are killed when they outlive their budget.

The budget checks inside a render (workers/chat_template.py) stop every runaway
template we know of, with a message that names the limit. A child process is the
backstop for what they cannot interrupt (one long C-level call): the parent waits
for the reply only until the deadline plus a grace period, then kills the child and
starts another on next use. Children also run under an address-space limit, so a
template that allocates gigabytes gets a MemoryError, not the host's memory, and
they get no environment beyond PATH: no database URL, no secrets.

`RendererPool.render` blocks; callers on an event loop run it in a thread
(gateway/text.py). Protocol: 4-byte big-endian length, then a JSON object, each way;
the child's first frame is empty (started, ready to render).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import select
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from jinja2.exceptions import TemplateError

from workers.chat_template import CompiledTemplate, TemplateBudget, TemplateBudgetExceeded

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
_HEADER = struct.Struct(">I")
_CHILD_CACHE = 32
"""Compiled templates a child keeps, by source text (a gateway serves a few models)."""
_START_S = 30.0
"""How long a new child may take to start (not part of any render's budget)."""


class TemplateRenderError(Exception):
    """The template itself failed (raise_exception, a syntax error, a type error)."""


class _Child:
    def __init__(self, memory_bytes: int) -> None:
        bootstrap = (
            f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            f"from workers.template_process import child_main; child_main({memory_bytes})"
        )
        # -I: ignore PYTHON* variables and the user site; env: nothing the parent holds.
        self.popen = subprocess.Popen(  # noqa: S603 (our own interpreter and code)
            [sys.executable, "-I", "-c", bootstrap],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"},
            cwd=ROOT,
        )
        # The child says it is ready (an empty frame) once imported: a render's deadline
        # then counts the render alone, never the interpreter's start on a busy host.
        try:
            assert self.popen.stdout is not None
            _read_exactly(self.popen.stdout, _HEADER.size, time.monotonic() + _START_S)
        except BaseException:
            self.kill()
            raise

    def ask(self, request: Mapping[str, Any], wait_s: float) -> dict[str, Any]:
        assert self.popen.stdin is not None and self.popen.stdout is not None
        payload = json.dumps(request, ensure_ascii=False).encode()
        self.popen.stdin.write(_HEADER.pack(len(payload)) + payload)
        self.popen.stdin.flush()
        deadline = time.monotonic() + wait_s
        header = _read_exactly(self.popen.stdout, _HEADER.size, deadline)
        body = _read_exactly(self.popen.stdout, _HEADER.unpack(header)[0], deadline)
        reply: dict[str, Any] = json.loads(body)
        return reply

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                stream.close()


def _read_exactly(stream: IO[bytes], size: int, deadline: float) -> bytes:
    fd = stream.fileno()
    # poll, not select: a busy gateway holds over 1024 descriptors (its clients' sockets),
    # and select() refuses any numbered above that ("filedescriptor out of range").
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks: list[bytes] = []
    left = size
    while left:
        wait = deadline - time.monotonic()
        if wait <= 0 or not poller.poll(max(1, math.ceil(wait * 1000))):
            raise TimeoutError
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class RendererPool:
    """At most `size` renders at once, each in a child process of its own."""

    def __init__(self, size: int = 2, memory_bytes: int = 256 << 20, grace_s: float = 1.0) -> None:
        self.size = size
        self.memory_bytes = memory_bytes
        self.grace_s = grace_s
        self._slots = threading.BoundedSemaphore(size)
        self._idle: queue.SimpleQueue[_Child] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._children: set[_Child] = set()
        self.kills = 0
        """Children killed for outliving their deadline (a metric and a test hook)."""

    def render(
        self,
        source: str,
        variables: Mapping[str, Any],
        budget: TemplateBudget,
        *,
        kill_after_s: float | None = None,
    ) -> str:
        """The rendered text; TemplateBudgetExceeded or TemplateRenderError otherwise.

        `kill_after_s` (default: the budget plus the grace period) is how long the
        parent waits before it kills the child.
        """
        request = {"source": source, "variables": dict(variables), "budget": budget.as_dict()}
        wait_s = budget.seconds + self.grace_s if kill_after_s is None else kill_after_s
        with self._slots:
            child = self._take()
            try:
                reply = child.ask(request, wait_s)
            except TimeoutError:
                self._discard(child)
                self.kills += 1
                logger.warning("killed a chat template renderer after %.1f s", wait_s)
                raise TemplateBudgetExceeded(
                    "time", f"ran past its time budget of {budget.seconds:g} s"
                ) from None
            except (EOFError, OSError, ValueError):
                # The child died (its memory limit, most likely) or wrote garbage.
                self._discard(child)
                raise TemplateBudgetExceeded("memory", "ran out of memory") from None
            except BaseException:
                self._discard(child)
                raise
            self._idle.put(child)
        if "text" in reply:
            return str(reply["text"])
        if reply.get("error") == "budget":
            raise TemplateBudgetExceeded(str(reply["limit"]), str(reply["message"]))
        raise TemplateRenderError(str(reply.get("message", "the template failed")))

    def close(self) -> None:
        with self._lock:
            children, self._children = self._children, set()
        for child in children:
            child.kill()

    def _take(self) -> _Child:
        try:
            child = self._idle.get_nowait()
        except queue.Empty:
            child = _Child(self.memory_bytes)
            with self._lock:
                self._children.add(child)
            return child
        if child.popen.poll() is not None:  # died while idle
            self._discard(child)
            return self._take()
        return child

    def _discard(self, child: _Child) -> None:
        child.kill()
        with self._lock:
            self._children.discard(child)


# --- the child ---------------------------------------------------------------------------


def child_main(memory_bytes: int) -> None:
    import resource

    if memory_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(_HEADER.pack(0))  # ready
    stdout.flush()
    compiled: OrderedDict[str, CompiledTemplate] = OrderedDict()
    while True:
        header = stdin.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return  # the parent went away
        request = json.loads(stdin.read(_HEADER.unpack(header)[0]))
        reply = _render_one(request, compiled)
        payload = json.dumps(reply, ensure_ascii=False).encode()
        stdout.write(_HEADER.pack(len(payload)) + payload)
        stdout.flush()


def _render_one(
    request: dict[str, Any], compiled: OrderedDict[str, CompiledTemplate]
) -> dict[str, Any]:
    source = str(request["source"])
    try:
        template = compiled.get(source)
        if template is None:
            template = CompiledTemplate(source)
            compiled[source] = template
            if len(compiled) > _CHILD_CACHE:
                compiled.popitem(last=False)
        compiled.move_to_end(source)
        text = template.render(request["variables"], TemplateBudget.from_dict(request["budget"]))
    except TemplateBudgetExceeded as exc:
        return {"error": "budget", "limit": exc.limit, "message": exc.message}
    except TemplateError as exc:
        return {"error": "template", "message": str(exc)}
    except MemoryError:
        return {"error": "budget", "limit": "memory", "message": "ran out of memory"}
    except Exception as exc:  # a type error in template code is the template's fault
        return {"error": "template", "message": f"{type(exc).__name__}: {exc}"}
    return {"text": text}
