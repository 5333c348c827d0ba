"""Tools and structured outputs: what chat completions and the Responses API share.

- Tools as the gateway checks them (`Tool`, `check_tools`), the choice of a tool
  (`tool_choice_of`), and the grammar that forces a call or a JSON shape (`grammar_for`,
  built by workers/grammar.py so the worker compiles exactly what was checked here).
- The conversation rendered for the model's chat template (`template_messages`): with the
  template's own tool support where it has one (its source uses `tools`), otherwise in one
  generic format (docs/api.md, "Tool calling"): the tools listed in the system message,
  calls written as `<tool_call>` blocks, results as `<tool_response>` blocks.
- The model's text split into content and tool calls, whole (`split_tool_calls`) or as it
  streams (`ToolCallStream`). A forced call (constrained decoding) streams its arguments as
  they come; a call the model chose to make (`auto`) is held until it is complete and is
  text again if it is not a well-formed call to a known tool.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core import turns
from gateway.errors import OpenAIError, invalid
from workers import grammar
from workers.grammar import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

MAX_TOOLS = 128  # OpenAI's limit
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_DESCRIPTION_CHARS = 4096

_ID_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    """An OpenAI-style id: `call_`, `fc_`, `msg_`... and 24 random letters and digits."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def new_call_id() -> str:
    return new_id("call_")


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call: its name, what it does, the JSON schema of its
    arguments (an object), and `strict` (accepted; arguments are always constrained to the
    schema when a call is forced)."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object"})
    strict: bool = False

    def described(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of the arguments object


def check_tools(tools: Sequence[Tool], param: Callable[[int], str]) -> None:
    """400 for what no tool may be: too many, a bad or duplicate name, a description over
    the limit, parameters that are not an object schema, schemas over the request's budget
    or that do not compile. `param(i)` names tool i on the wire (`tools[i].function` for
    chat, `tools[i]` for responses)."""
    if len(tools) > MAX_TOOLS:
        raise invalid(f"at most {MAX_TOOLS} tools may be given; got {len(tools)}", "tools")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if not TOOL_NAME.match(tool.name):
            raise invalid(
                f"Invalid tool name {tool.name[:80]!r}: names are 1 to 64 letters, digits, "
                "underscores and dashes",
                f"{param(i)}.name",
            )
        if tool.name in seen:
            raise invalid(f"Duplicate tool name {tool.name!r}", f"{param(i)}.name")
        seen.add(tool.name)
        if len(tool.description) > MAX_DESCRIPTION_CHARS:
            raise invalid(
                f"the description is over {MAX_DESCRIPTION_CHARS} characters",
                f"{param(i)}.description",
            )
        if not isinstance(tool.parameters, Mapping):
            raise invalid("parameters must be a JSON schema object", f"{param(i)}.parameters")
    if not tools:
        return
    size = sum(_schema_bytes(t.parameters) for t in tools)
    if size > grammar.MAX_REQUEST_SCHEMA_BYTES:
        raise invalid(
            f"the tools' parameter schemas are {size} bytes as JSON together; at most "
            f"{grammar.MAX_REQUEST_SCHEMA_BYTES}",
            "tools",
        )
    # One compilation checks every tool (and is the grammar `required` uses); only when it
    # fails is each tool compiled alone, to name the one at fault.
    try:
        grammar.tool_call_grammar([(t.name, t.parameters) for t in tools], parallel=True)
    except grammar.GrammarError as together:
        for i, tool in enumerate(tools):
            try:
                grammar.tool_call_grammar([(tool.name, tool.parameters)], parallel=False)
            except grammar.GrammarError as exc:
                raise invalid(f"Invalid schema: {exc}", f"{param(i)}.parameters") from exc
        raise invalid(f"The tools' schemas together: {together}", "tools") from together


def _schema_bytes(schema: Mapping[str, Any]) -> int:
    try:
        return len(json.dumps(schema, separators=(",", ":")).encode())
    except (TypeError, ValueError):
        return 0  # not JSON: the compilation says so, naming the tool


def tool_choice_of(choice: str | None, tools: Sequence[Tool], param: str = "tool_choice") -> str:
    """`none`, `auto`, `required` or the name of one of `tools` (OpenAI's default: `auto`
    with tools, `none` without). A name not among the tools is a 400."""
    if choice is None:
        return "auto" if tools else "none"
    if choice in ("none", "auto", "required"):
        if choice == "required" and not tools:
            raise invalid("tool_choice 'required' needs at least one tool in tools", param)
        return choice
    if not any(t.name == choice for t in tools):
        raise invalid(f"tool_choice names the function {choice!r}, which is not in tools", param)
    return choice


def grammar_for(
    tools: Sequence[Tool],
    choice: str,
    *,
    parallel: bool,
    json_schema: Mapping[str, Any] | None = None,
    json_object: bool = False,
    format_param: str = "response_format",
) -> str:
    """The grammar decoding must follow ("" for none): a forced tool call for `required` or a
    named function, else the response format's JSON (an object, or `json_schema`)."""
    try:
        if choice == "required":
            return grammar.tool_call_grammar(
                [(t.name, t.parameters) for t in tools], parallel=parallel
            )
        if choice not in ("none", "auto"):
            named = next(t for t in tools if t.name == choice)
            return grammar.tool_call_grammar([(named.name, named.parameters)], parallel=False)
    except grammar.GrammarError as exc:  # checked tool by tool already; together, too big
        raise invalid(f"The tools' schemas together: {exc}", "tools") from exc
    if json_schema is None and not json_object:
        return ""
    try:
        return grammar.json_grammar(json_schema)
    except grammar.GrammarError as exc:
        raise invalid(f"Invalid schema for {format_param}: {exc}", format_param) from exc


@dataclass(frozen=True, slots=True)
class Plan:
    """What a request asks of decoding, checked: its tools, their choice (`none`, `auto`,
    `required` or a tool's name), whether calls may be parallel, and the grammar ("" for
    none)."""

    tools: tuple[Tool, ...]
    choice: str
    parallel: bool
    grammar: str

    @property
    def detect(self) -> bool:
        """Whether the answer may hold tool calls."""
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        """Whether the answer is a tool call, constrained by the grammar."""
        return self.choice not in ("none", "auto")


async def plan(
    tools: Sequence[Tool],
    choice: str | None,
    *,
    parallel: bool,
    tool_param: Callable[[int], str],
    json_schema: Mapping[str, Any] | None = None,
    json_object: bool = False,
    format_param: str = "response_format",
) -> Plan:
    """Tools, tool choice and response format checked (400s naming the parameter) and their
    grammar built, before anything is read or reserved. Compiling schemas is CPU work that
    a tenant sizes: it runs on a thread (llguidance releases the GIL), never on the event
    loop; a request without tools or a schema never leaves the loop."""

    def build() -> Plan:
        check_tools(tools, tool_param)
        chosen = tool_choice_of(choice, tools)
        found = grammar_for(
            tools,
            chosen,
            parallel=parallel,
            json_schema=json_schema,
            json_object=json_object,
            format_param=format_param,
        )
        return Plan(tuple(tools), chosen, parallel, found)

    if not tools and json_schema is None and not json_object:
        return build()
    async with turns.away():
        return await asyncio.to_thread(build)


# --- the prompt -----------------------------------------------------------------------------


def native_tools(template: str) -> bool:
    """Whether the model's chat template renders tools itself (it reads `tools`)."""
    return re.search(r"\btools\b", template) is not None


def _call_block(call: ToolCall) -> str:
    try:
        arguments: Any = json.loads(call.arguments)
    except ValueError:
        arguments = call.arguments
    payload = json.dumps({"name": call.name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{payload}\n{TOOL_CALL_CLOSE}"


def _tools_instruction(tools: Sequence[Tool]) -> str:
    listed = "\n".join(json.dumps(t.described(), ensure_ascii=False) for t in tools)
    return (
        "You can call functions. Each line below describes one: its name, what it does and "
        "the JSON schema of its arguments.\n"
        f"{listed}\n"
        "To call a function, answer with\n"
        f'{TOOL_CALL_OPEN}\n{{"name": <function name>, "arguments": <arguments object>}}\n'
        f"{TOOL_CALL_CLOSE}\n"
        "one block per call, and nothing else. A function's result comes back as "
        "<tool_response>...</tool_response>."
    )


def template_messages(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Tool],
    *,
    native: bool,
    offer_tools: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages (and the `tools` variable, None when not used) to render the template
    with. Messages are {role, content} with `tool_calls` (a list of ToolCall) on assistant
    turns and `tool_call_id` on tool results. `offer_tools` False (tool_choice `none`)
    leaves the tools out of the prompt."""
    if native:
        out: list[dict[str, Any]] = []
        for m in messages:
            item: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
            if m.get("tool_calls"):
                item["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": _arguments_value(c)},
                    }
                    for c in m["tool_calls"]
                ]
            if m.get("tool_call_id"):
                item["tool_call_id"] = m["tool_call_id"]
            out.append(item)
        variables = (
            [{"type": "function", "function": t.described()} for t in tools]
            if tools and offer_tools
            else None
        )
        return out, variables
    rendered: list[dict[str, Any]] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if rendered and rendered[-1].get("_tool_results"):
                rendered[-1]["content"] += "\n" + block
            else:
                rendered.append({"role": "user", "content": block, "_tool_results": True})
            continue
        if role == "assistant" and m.get("tool_calls"):
            blocks = "\n".join(_call_block(c) for c in m["tool_calls"])
            content = f"{content}\n{blocks}" if content else blocks
        rendered.append({"role": role, "content": content})
    for item in rendered:
        item.pop("_tool_results", None)
    if tools and offer_tools:
        instruction = _tools_instruction(tools)
        if rendered and rendered[0]["role"] == "system":
            rendered[0]["content"] = f"{rendered[0]['content']}\n\n{instruction}"
        else:
            rendered.insert(0, {"role": "system", "content": instruction})
    return rendered, None


def _arguments_value(call: ToolCall) -> Any:
    try:
        return json.loads(call.arguments)
    except ValueError:
        return call.arguments


# --- the answer -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Text:
    text: str


@dataclass(frozen=True, slots=True)
class CallStart:
    index: int  # among this answer's calls
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class CallArguments:
    index: int
    text: str


Piece = Text | CallStart | CallArguments


def _header(name: str) -> str:
    return f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": '


class ToolCallStream:
    """Splits generated text into content and tool calls, piece by piece.

    `detect` False (no tools, or tool_choice `none`): everything is content. `forced`
    (the call was constrained by the grammar): a call streams as soon as its name is known,
    its arguments piece by piece. Otherwise a `<tool_call>` block is held until it closes
    (or the text ends) and becomes a call only if it is a JSON object naming a known tool
    with an object of arguments; anything else is content, as written.
    """

    def __init__(self, tools: Sequence[Tool], *, detect: bool, forced: bool = False) -> None:
        self._names = {t.name for t in tools}
        self._detect = detect and bool(tools)
        self._forced = forced
        self._buffer = ""
        self.calls: list[ToolCall] = []
        self.content = ""
        # A forced call being streamed: its arguments so far, JSON depth, string state.
        self._streaming: ToolCall | None = None
        self._args = ""
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._closing = ""

    def push(self, text: str) -> list[Piece]:
        if not self._detect:
            self.content += text
            return [Text(text)] if text else []
        self._buffer += text
        return self._drain(final=False)

    def finish(self) -> list[Piece]:
        if not self._detect:
            return []
        return self._drain(final=True)

    def _text(self, text: str, out: list[Piece]) -> None:
        if text:
            self.content += text
            out.append(Text(text))

    def _drain(self, *, final: bool) -> list[Piece]:
        out: list[Piece] = []
        while self._buffer:
            if self._closing:
                self._skip_closing()
                continue
            if self._streaming is not None:
                if not self._stream_arguments(out):
                    break
                continue
            at = self._buffer.find(TOOL_CALL_OPEN)
            if at < 0 and self.calls and not self._buffer.strip():
                if final:  # whitespace after the last call is not content
                    self._buffer = ""
                break
            if at < 0:
                # Hold a tail that may still become the opening tag.
                keep = 0 if final else _partial_suffix(self._buffer, TOOL_CALL_OPEN)
                if keep and self.calls and not self._buffer[: len(self._buffer) - keep].strip():
                    break  # between calls: whitespace, then what may be the next call
                self._text(self._buffer[: len(self._buffer) - keep], out)
                self._buffer = self._buffer[len(self._buffer) - keep :]
                break
            # Whitespace between calls is not content.
            before = self._buffer[:at]
            if not (self.calls and not before.strip()):
                self._text(before, out)
            self._buffer = self._buffer[at:]
            if self._forced and self._start_streaming(out):
                continue
            end = self._buffer.find(TOOL_CALL_CLOSE)
            if end < 0:
                if final:
                    self._text(self._buffer, out)
                    self._buffer = ""
                break
            block = self._buffer[: end + len(TOOL_CALL_CLOSE)]
            self._buffer = self._buffer[end + len(TOOL_CALL_CLOSE) :]
            call = self._parse_block(block[len(TOOL_CALL_OPEN) : -len(TOOL_CALL_CLOSE)])
            if call is None:
                self._text(block, out)
            else:
                index = len(self.calls)
                self.calls.append(call)
                out.append(CallStart(index, call.id, call.name))
                out.append(CallArguments(index, call.arguments))
        if final and self._streaming is not None:
            # Cut off (max_tokens): the call goes out with the arguments it got.
            self._end_streaming()
        if final and self._buffer:
            self._text(self._buffer, out)
            self._buffer = ""
        return out

    def _start_streaming(self, out: list[Piece]) -> bool:
        """A forced call's header, once its name is complete."""
        for name in self._names:
            header = _header(name)
            if self._buffer.startswith(header):
                self._buffer = self._buffer[len(header) :]
                call = ToolCall(new_call_id(), name, "")
                self._streaming = call
                self._args, self._depth, self._in_string, self._escaped = "", 0, False, False
                out.append(CallStart(len(self.calls), call.id, name))
                return True
        return False

    def _stream_arguments(self, out: list[Piece]) -> bool:
        """Arguments up to the end of their JSON object, then the block's close; returns
        whether it consumed anything."""
        assert self._streaming is not None
        index = len(self.calls)
        taken = 0
        done = False
        for ch in self._buffer:
            taken += 1
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    done = True
                    break
        piece = self._buffer[:taken]
        self._buffer = self._buffer[taken:]
        if piece:
            self._args += piece
            out.append(CallArguments(index, piece))
        if done:
            self._closing = "}\n" + TOOL_CALL_CLOSE  # the grammar's; skipped as it arrives
            self._end_streaming()
        return taken > 0

    def _skip_closing(self) -> None:
        n = 0
        while n < min(len(self._closing), len(self._buffer)) and (
            self._closing[n] == self._buffer[n]
        ):
            n += 1
        self._buffer = self._buffer[n:]
        self._closing = self._closing[n:] if self._buffer == "" else ""

    def _end_streaming(self) -> None:
        assert self._streaming is not None
        self.calls.append(ToolCall(self._streaming.id, self._streaming.name, self._args))
        self._streaming = None

    def _parse_block(self, body: str) -> ToolCall | None:
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict) or set(data) - {"name", "arguments"}:
            return None
        name, arguments = data.get("name"), data.get("arguments", {})
        if name not in self._names:
            return None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ToolCall(new_call_id(), str(name), json.dumps(arguments, ensure_ascii=False))


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_tool_calls(
    text: str, tools: Sequence[Tool], *, detect: bool, forced: bool = False
) -> tuple[str, list[ToolCall]]:
    """The whole answer as (content, calls)."""
    stream = ToolCallStream(tools, detect=detect, forced=forced)
    stream.push(text)
    stream.finish()
    return stream.content, stream.calls


def unsupported(what: str, param: str) -> OpenAIError:
    return invalid(f"{what} is not supported", param)
