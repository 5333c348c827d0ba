"""The tokenizer step's checks of a tenant's text files against what the gateway will serve.

The gateway runs a model's chat template and tokenizer in a process shared by every
tenant (gateway/text.py bounds them there too); refusing an over-budget one here
tells its owner why at compile time, in the step log, instead of failing each request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workers.chat_template import TemplateBudget, TemplateBudgetExceeded, adversarial_conversations
from workers.compile.validate import CompileError
from workers.template_process import RendererPool, TemplateRenderError
from workers.tokenizer_limits import (
    TokenizerLimits,
    TokenizerRejected,
    check_tokenizer_json,
    probe_tokenizer,
)

Say = Callable[..., None]
"""A step's log: `say(message, *args)`, %-style."""


def check_tokenizer(say: Say, path: Path, limits: TokenizerLimits, probe_s: float) -> None:
    """Size, vocabulary and regexes first (cheap), then the timed probe in a child process."""
    try:
        check_tokenizer_json(path, limits)
    except TokenizerRejected as exc:
        raise CompileError(
            f"{path.name} is over the platform's limits: {exc}", code="tokenizer_over_limits"
        ) from exc
    except ValueError as exc:  # not JSON: the tokenizers loader says so in its own words
        say("%s does not parse as JSON: %s", path.name, exc)
        return
    started = time.monotonic()
    try:
        probe_tokenizer(path, probe_s)
    except TokenizerRejected as exc:
        raise CompileError(f"{path.name} is refused: {exc}", code="tokenizer_over_limits") from exc
    say(
        "tokenizer limits: %d bytes; adversarial probe passed in %.2f s",
        path.stat().st_size,
        time.monotonic() - started,
    )


def check_chat_template(say: Say, source: str, budget: TemplateBudget) -> dict[str, Any]:
    """Renders the template on adversarial conversations under the gateway's budget.

    A template that exceeds it is refused; one that refuses an input (raise_exception
    on a role it does not take) ships: the gateway answers that request with a 400.
    Renders go through the gateway's renderer (a child process killed at the deadline).
    """
    results: dict[str, Any] = {}
    pool = RendererPool(size=1)
    try:
        for name, variables in adversarial_conversations(budget):
            started = time.monotonic()
            try:
                rendered = pool.render(source, variables, budget)
            except TemplateBudgetExceeded as exc:
                raise CompileError(
                    f"the chat template is refused: rendering {name}, it {exc.message} "
                    f"(budget: {budget.seconds:g} s, {budget.max_output_chars} characters "
                    f"of output, {budget.max_iterations} loop iterations)",
                    code="chat_template_over_budget",
                ) from exc
            except TemplateRenderError as exc:
                say("chat template refuses %s: %s", name, exc)
                results[name] = {"refused": str(exc)[:200]}
                continue
            seconds = round(time.monotonic() - started, 4)
            results[name] = {"chars": len(rendered), "seconds": seconds}
            say("chat template renders %s: %d characters", name, len(rendered))
    finally:
        pool.close()
    return results
