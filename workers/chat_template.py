"""Chat templates rendered under a budget: time, output size and loop iterations.

A chat template is tenant code (Jinja) that the platform runs on every chat request.
The sandbox (jinja2's ImmutableSandboxedEnvironment) stops it reaching Python
internals; this module also stops it using unbounded time or memory. Every loop
item, call, filter, intercepted operator and emitted piece of output passes a
meter that checks a deadline and the size budget *before* the work that would
exceed it, so a runaway template stops itself with a message that names the limit.

What a check inside the render cannot interrupt is one long C-level operation that
slipped past the pre-checks; workers/template_process.py therefore runs renders in
child processes with a memory limit and kills one that outlives its deadline.
Both the gateway and the compile pipeline render through that pool.
"""

from __future__ import annotations

import contextvars
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import wraps
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

MAX_SOURCE_CHARS = 64 * 1024
"""Real chat templates are a few KiB (Llama 3.1's, with tools, is ~8 KiB)."""


@dataclass(frozen=True, slots=True)
class TemplateBudget:
    """What one render may use. The gateway reads it from settings (MANTLE_TEMPLATE_*)."""

    seconds: float = 1.0
    max_output_chars: int = 4 * 1024 * 1024
    max_iterations: int = 1_000_000
    """Loop items over the whole render: deterministic, unlike the clock."""
    max_int_argument: int = 100_000
    """Largest integer a call or filter takes (widths, counts, range bounds)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TemplateBudget:
        return cls(**{k: data[k] for k in cls.__slots__ if k in data})


def template_budget_from_env() -> TemplateBudget:
    """The budget from MANTLE_TEMPLATE_* (a compile node has no Django settings)."""
    base = TemplateBudget()

    def value(name: str, default: float) -> float:
        raw = os.environ.get(name, "").strip()
        return float(raw) if raw else default

    return TemplateBudget(
        seconds=value("MANTLE_TEMPLATE_BUDGET_S", base.seconds),
        max_output_chars=int(value("MANTLE_TEMPLATE_MAX_OUTPUT_CHARS", base.max_output_chars)),
        max_iterations=int(value("MANTLE_TEMPLATE_MAX_ITERATIONS", base.max_iterations)),
    )


class TemplateBudgetExceeded(Exception):
    """The render went over its budget; `limit` is time | output | iterations | argument
    | memory. The message completes the sentence "the model's chat template ..."."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit
        self.message = message


class _Meter:
    """The budget of the render in progress (one per render, via a context variable)."""

    __slots__ = ("budget", "deadline", "iterations", "output")

    def __init__(self, budget: TemplateBudget) -> None:
        self.budget = budget
        self.deadline = time.monotonic() + budget.seconds
        self.iterations = 0
        self.output = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateBudgetExceeded(
                "time", f"ran past its time budget of {self.budget.seconds:g} s"
            )

    def iterate(self) -> None:
        self.iterations += 1
        if self.iterations > self.budget.max_iterations:
            raise TemplateBudgetExceeded(
                "iterations",
                f"loops more than {self.budget.max_iterations} times (nested loops?)",
            )
        if not self.iterations & 0x3FF:  # the clock every 1024 items keeps loops cheap
            self.tick()

    def size(self, chars: int, what: str) -> None:
        if chars > self.budget.max_output_chars:
            raise TemplateBudgetExceeded(
                "output",
                f"builds {what} of {chars} characters, over its budget of "
                f"{self.budget.max_output_chars}",
            )

    def emit(self, chars: int) -> None:
        self.output += chars
        if self.output > self.budget.max_output_chars:
            raise TemplateBudgetExceeded(
                "output",
                f"writes more than its output budget of {self.budget.max_output_chars} characters",
            )

    def argument(self, value: Any) -> None:
        if type(value) is int and abs(value) > self.budget.max_int_argument:
            raise TemplateBudgetExceeded(
                "argument",
                f"passes {value} to a call or filter, over the limit of "
                f"{self.budget.max_int_argument}",
            )


_meter: contextvars.ContextVar[_Meter] = contextvars.ContextVar("chat_template_meter")


def _current() -> _Meter:
    try:
        return _meter.get()
    except LookupError:
        # A template object used outside render(): no budget was set, so refuse.
        raise TemplateBudgetExceeded("time", "was rendered without a budget") from None


def _length(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple, dict)) else 0


# printf-style and str.format width/precision numbers: "%09999999d", "{:>9999999}".
_PRINTF_NUMBERS = re.compile(r"%[#0\- +]*(\d*)(?:\.(\d*))?")
_FORMAT_NUMBERS = re.compile(r"\{[^{}]*?:[^{}]*?(\d+)(?:\.(\d+))?[^{}]*\}")


# A width taken from the arguments: "%*d" % (10**9, 1), "{:{w}}".format(x, w=10**9).
_PRINTF_STAR = re.compile(r"%[#0\- +]*(?:\*|\d*\.\*)")
_FORMAT_NESTED = re.compile(r"\{[^{}]*:[^{}]*\{")


def _format_widths(meter: _Meter, pattern: str, spec: re.Pattern[str]) -> None:
    for match in spec.finditer(pattern):
        for group in match.groups():
            if group:
                meter.argument(int(group[:12]))


def _printf(meter: _Meter, pattern: str, values: Any) -> None:
    """Widths of a %-format, written in it or (`*`) taken from its values."""
    _format_widths(meter, pattern, _PRINTF_NUMBERS)
    if _PRINTF_STAR.search(pattern):
        for value in values if isinstance(values, (tuple, list)) else (values,):
            meter.argument(value)


def _str_format(meter: _Meter, pattern: str, values: Sequence[Any]) -> None:
    """Widths of a str.format pattern, written in it or (nested fields) taken from values."""
    _format_widths(meter, pattern, _FORMAT_NUMBERS)
    if _FORMAT_NESTED.search(pattern):
        for value in values:
            for item in value.values() if isinstance(value, dict) else (value,):
                meter.argument(item)


def _projected(meter: _Meter, name: str, subject: Any, args: Sequence[Any]) -> None:
    """Refuses the few str operations whose result can dwarf their inputs, before they run."""
    if not isinstance(subject, str):
        return
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str):
        count = subject.count(args[0]) if args[0] else len(subject) + 1
        if len(args) >= 3 and type(args[2]) is int and args[2] >= 0:
            count = min(count, args[2])
        grow = max(0, len(str(args[1])) - len(args[0]))
        meter.size(len(subject) + count * grow, "a string")
    elif name == "join" and args and isinstance(args[0], (list, tuple)):
        items = args[0]
        total = sum(_length(i) for i in items) + len(subject) * max(0, len(items) - 1)
        meter.size(total, "a string")
    elif name == "expandtabs":
        tab = int(args[0]) if args and type(args[0]) is int else 8
        meter.size(len(subject) + subject.count("\t") * max(0, tab), "a string")
    elif name in {"format", "format_map"}:
        _str_format(meter, subject, args)


class _Guard(NodeTransformer):
    """Routes every loop's items and every piece of output through the meter."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _LOOP_FILTER, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [
            nodes.Filter(n, _OUTPUT_FILTER, [], [], None, None, lineno=n.lineno) for n in node.nodes
        ]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        # `a ~ b` joins in one C call: sum the parts' sizes before joining.
        return nodes.Filter(
            nodes.List(node.nodes, lineno=node.lineno),
            _CONCAT_FILTER,
            [],
            [],
            None,
            None,
            lineno=node.lineno,
        )


_LOOP_FILTER = "__mantle_loop"
_OUTPUT_FILTER = "__mantle_output"
_CONCAT_FILTER = "__mantle_concat"


def _loop(items: Iterable[Any]) -> Iterator[Any]:
    meter = _current()
    for item in items:
        meter.iterate()
        yield item


def _output(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    _current().emit(len(text))
    return text


def _concat(parts: Sequence[Any]) -> str:
    meter = _current()
    texts = [p if isinstance(p, str) else str(p) for p in parts]
    meter.size(sum(len(t) for t in texts), "a string")
    return "".join(texts)


def _wrap_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    # A context, eval-context or environment filter gets that object first.
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @wraps(func)  # keeps jinja_pass_arg, so those filters still get their first argument
    def guarded(*args: Any, **kwargs: Any) -> Any:
        meter = _current()
        meter.tick()
        subject = args[skip] if len(args) > skip else None
        rest = [*args[skip + 1 :], *kwargs.values()]
        if name != "format":  # format's arguments are values, its widths are checked below
            for value in rest:
                meter.argument(value)
        if name == "join" and subject is not None and not isinstance(subject, str):
            items = list(subject)  # the filter lists it anyway; measure before joining
            sep = str(rest[0]) if rest and isinstance(rest[0], str) else ""
            total = sum(len(str(i)) for i in items) + len(sep) * max(0, len(items) - 1)
            meter.size(total, "a string")
            args = (*args[:skip], items, *args[skip + 1 :])
        elif name == "replace":
            _projected(meter, "replace", subject, rest)
        elif name in {"indent", "wordwrap"} and isinstance(subject, str):
            inserted = sum(len(v) for v in rest if isinstance(v, str))
            lines = subject.count("\n") + 1 if name == "indent" else len(subject)
            meter.size(len(subject) + lines * inserted, "a string")
        elif name == "format" and isinstance(subject, str):
            _printf(meter, subject, rest)
        result = func(*args, **kwargs)
        meter.size(_length(result), "a value")
        return result

    return guarded


class BudgetedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with every operation that can amplify work metered."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True)
        self.filters = {name: _wrap_filter(name, f) for name, f in self.filters.items()}
        self.filters[_LOOP_FILTER] = _loop
        self.filters[_OUTPUT_FILTER] = _output
        self.filters[_CONCAT_FILTER] = _concat
        self.globals["raise_exception"] = _raise_exception
        # `range` stays the sandbox's safe_range (at most MAX_RANGE items); its loops are metered.
        del self.globals["lipsum"]  # generates text in a pure-Python loop; no template needs it

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        meter = _current()
        meter.tick()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                    meter.size(len(seq) * max(times, 0), "a repeated value")
        elif operator == "**":
            if isinstance(left, (int, float)) and isinstance(right, (int, float)):
                # 9 ** 9 ** 9 is one C call of minutes: bound the exponent and the result.
                meter.argument(int(right) if abs(right) < 1e18 else 10**18)
                if isinstance(left, int) and isinstance(right, int) and right > 0:
                    meter.size(max(left.bit_length(), 1) * right // 8, "a number")
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                meter.size(len(left) + len(right), "a value")
        elif operator == "%" and isinstance(left, str):
            _printf(meter, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        meter = _current()
        meter.tick()
        # str.format reaches here wrapped by the sandbox; its __wrapped__ is the bound method.
        bound = getattr(__obj, "__wrapped__", __obj)
        name = getattr(bound, "__name__", "")
        owner = getattr(bound, "__self__", None)
        if isinstance(owner, (str, list, tuple, dict)) and name not in {"format", "format_map"}:
            # Widths and counts of built-in methods ("x".center(10**9)); a macro's or
            # format's arguments are data.
            for value in (*args, *kwargs.values()):
                meter.argument(value)
        if name == "join" and isinstance(owner, str) and args and not isinstance(args[0], str):
            args = (list(args[0]), *args[1:])  # join lists it anyway; measure it first
        _projected(meter, name, owner, (*args, *kwargs.values()) if "format" in name else args)
        result = super().call(__context, __obj, *args, **kwargs)
        meter.size(_length(result), "a value")
        return result


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


class CompiledTemplate:
    """A chat template parsed once, rendered many times, each render with its own budget."""

    def __init__(self, source: str) -> None:
        if len(source) > MAX_SOURCE_CHARS:
            raise TemplateBudgetExceeded(
                "output", f"is {len(source)} characters long, over the limit of {MAX_SOURCE_CHARS}"
            )
        env = BudgetedSandbox()
        tree = _Guard().visit(env.parse(source))
        self._template = env.template_class.from_code(
            env, env.compile(tree), env.make_globals(None)
        )

    def render(self, variables: Mapping[str, Any], budget: TemplateBudget) -> str:
        meter = _Meter(budget)
        token = _meter.set(meter)
        try:
            # Output was charged piece by piece by the output filter as it was produced.
            return "".join(self._template.generate(**variables))
        except MemoryError:
            raise TemplateBudgetExceeded("memory", "ran out of memory") from None
        except RecursionError:
            raise TemplateBudgetExceeded("iterations", "recurses too deeply") from None
        finally:
            _meter.reset(token)


def chat_variables(messages: Sequence[Mapping[str, Any]], **extra: Any) -> dict[str, Any]:
    """What the gateway passes a chat template (docs/artifacts.md)."""
    return {
        "messages": [dict(m) for m in messages],
        "add_generation_prompt": True,
        "bos_token": "",
        "eos_token": "",
        **extra,
    }


ROLES = ("system", "user", "assistant", "tool")


def adversarial_conversations(budget: TemplateBudget) -> list[tuple[str, dict[str, Any]]]:
    """Inputs a template must render within its budget before a compile ships it.

    Shaped like what the gateway's body limit lets through: many short messages,
    a few long ones, every role in every position, characters templates split on.
    """
    long_text = ("The quick brown fox. " * 3000)[:60_000]
    tricky = "{{ }} {% %} <|im_end|> \n\n\t '\" \\ é 中 \u200b " * 200
    many = [{"role": ROLES[i % len(ROLES)], "content": f"message {i}"} for i in range(2000)]
    alternating = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": long_text[:2000]}
        for i in range(400)
    ]
    return [
        ("a short conversation", chat_variables([{"role": "user", "content": "Hello"}])),
        (
            "a system prompt and a long message",
            chat_variables(
                [{"role": "system", "content": tricky}, {"role": "user", "content": long_text}]
            ),
        ),
        ("2000 messages in every role", chat_variables(many)),
        ("400 alternating long messages", chat_variables(alternating)),
        ("an empty message", chat_variables([{"role": "user", "content": ""}])),
    ]
