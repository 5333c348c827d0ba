"""The compile pipeline's tokenizer step refuses over-budget chat templates and tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.workers.test_tokenizer_limits import word_level
from workers.chat_template import TemplateBudget
from workers.compile.steps.base import Step
from workers.compile.text_checks import check_chat_template, check_tokenizer
from workers.compile.validate import CompileError
from workers.tokenizer_limits import TokenizerLimits

HOSTILE = (
    "{% for m in messages %}{% for i in range(100000) %}{{ m.content }}{% endfor %}{% endfor %}"
)
PICKY = (
    "{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant') }}{% endif %}"
    "<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
)
# A generous clock, so that a busy machine does not turn a size limit into a time-out.
BUDGET = TemplateBudget(seconds=60)


def test_a_template_over_its_budget_is_refused_naming_the_input_and_the_limit() -> None:
    step = Step("tokenizer")
    with pytest.raises(CompileError) as err:
        check_chat_template(step.say, HOSTILE, BUDGET)

    # A short conversation fits (500000 characters); a long message does not.
    assert err.value.code == "chat_template_over_budget"
    assert err.value.message == (
        "the chat template is refused: rendering a system prompt and a long message, it writes "
        "more than its output budget of 4194304 characters (budget: 60 s, 4194304 characters of "
        "output, 1000000 loop iterations)"
    )
    assert step.log == ["chat template renders a short conversation: 500000 characters"]


def test_a_template_over_a_smaller_output_budget_is_refused_on_long_input() -> None:
    with pytest.raises(CompileError) as err:
        check_chat_template(
            Step("tokenizer").say, PICKY, TemplateBudget(seconds=60, max_output_chars=100_000)
        )

    assert err.value.code == "chat_template_over_budget"
    assert "rendering 400 alternating long messages, it writes more than its output budget" in (
        err.value.message
    )


def test_a_template_that_refuses_some_roles_within_budget_ships() -> None:
    step = Step("tokenizer")
    renders = check_chat_template(step.say, PICKY, BUDGET)

    assert (
        "chat template refuses 2000 messages in every role: roles are system, user and assistant"
        in step.log
    )
    assert renders["a short conversation"]["chars"] == len("<|user|>Hello<|assistant|>")
    assert renders["2000 messages in every role"] == {
        "refused": "roles are system, user and assistant"
    }


def test_a_tokenizer_over_its_limits_is_refused(tmp_path: Path) -> None:
    path = word_level(tmp_path, vocab=11)
    with pytest.raises(CompileError) as err:
        check_tokenizer(Step("tokenizer").say, path, TokenizerLimits(max_vocab=10), 60)

    assert err.value.code == "tokenizer_over_limits"
    assert err.value.message == (
        "tokenizer.json is over the platform's limits: the vocabulary has 11 tokens, over the "
        "limit of 10"
    )


def test_a_catastrophic_pre_tokenizer_is_refused(tmp_path: Path) -> None:
    path = word_level(tmp_path, patterns=(r"(\w+\s?)*$",))
    with pytest.raises(CompileError) as err:
        check_tokenizer(Step("tokenizer").say, path, TokenizerLimits(), 60)

    assert err.value.code == "tokenizer_over_limits"
    assert "repeats a group that itself repeats" in err.value.message


def test_a_tokenizer_that_fails_the_timed_probe_is_refused(tmp_path: Path) -> None:
    # No time at all for the probe: what a catastrophic pattern the static check missed gets.
    with pytest.raises(CompileError) as err:
        check_tokenizer(Step("tokenizer").say, word_level(tmp_path), TokenizerLimits(), 0.0)

    assert err.value.code == "tokenizer_over_limits"
    assert "tokenizing adversarial text (long runs of one character) took over 0 s" in (
        err.value.message
    )


def test_a_tokenizer_within_limits_passes_and_says_so(tmp_path: Path) -> None:
    step = Step("tokenizer")
    check_tokenizer(step.say, word_level(tmp_path), TokenizerLimits(), 60)

    assert step.log[0].startswith("tokenizer limits: ")
    assert "adversarial probe passed" in step.log[0]
