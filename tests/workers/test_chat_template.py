"""Chat templates under a budget: the limits inside the render and the child process's kill."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tests.support.stack import builtin_manifests
from workers.chat_template import (
    CompiledTemplate,
    TemplateBudget,
    TemplateBudgetExceeded,
    adversarial_conversations,
    chat_variables,
)
from workers.template_process import RendererPool, TemplateRenderError

HELLO = chat_variables([{"role": "user", "content": "Hello"}])
NESTED_LOOPS = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
# The clock has its own test; elsewhere a generous one keeps a busy machine from
# turning a deterministic limit (loop items, sizes) into a time-out.
BUDGET = TemplateBudget(seconds=60)


def render(source: str, budget: TemplateBudget = BUDGET, variables: Any = HELLO) -> str:
    return CompiledTemplate(source).render(variables, budget)


@pytest.fixture
def pool() -> Iterator[RendererPool]:
    pool = RendererPool(size=1, memory_bytes=512 * 1024**2, grace_s=5.0)
    yield pool
    pool.close()


@pytest.mark.parametrize(
    ("source", "limit", "words"),
    [
        (NESTED_LOOPS, "iterations", "loops more than 1000000 times"),
        ("{{ 'x' * 1000000000 }}", "output", "repeated value of 1000000000 characters"),
        ("{{ [1] * 100000000 }}", "output", "repeated value of 100000000 characters"),
        ("{{ 9 ** (9 ** 9) }}", "argument", "passes 387420489"),
        ("{{ 'x'|center(1000000000) }}", "argument", "passes 1000000000"),
        ("{{ 'x'.ljust(1000000000) }}", "argument", "passes 1000000000"),
        ("{{ '%0999999999d' % 1 }}", "argument", "passes 999999999"),
        ("{{ '%0999999999d'|format(1) }}", "argument", "passes 999999999"),
        ("{{ '{:>999999999}'.format(1) }}", "argument", "passes 999999999"),
        ("{{ '%*d' % (999999999, 1) }}", "argument", "passes 999999999"),
        ("{{ '%*d'|format(999999999, 1) }}", "argument", "passes 999999999"),
        ("{{ '{:{w}}'.format(1, w=999999999) }}", "argument", "passes 999999999"),
        ("{{ range(100000)|join('x' * 100000) }}", "output", "builds a string"),
        ("{{ ('x' * 10000).join(range(10000)|map('string')) }}", "output", "builds a string"),
        ("{{ ('x' * 100000).replace('', 'y' * 1000) }}", "output", "builds a string"),
        ("{{ ('x' * 100000)|replace('', 'y' * 1000) }}", "output", "builds a string"),
        ("{{ ('x\n' * 100000)|indent('y' * 10000) }}", "output", "builds a string"),
        (
            "{% set a = 'x' * 1000000 %}{% set b = a ~ a ~ a ~ a ~ a %}{{ b|length }}",
            "output",
            "builds a string of 5000000 characters",
        ),
        (
            # Output written into a macro's buffer counts too, before it is joined.
            "{% set big = 'x' * 4000000 %}{% macro m() %}{% for i in range(100) %}{{ big }}"
            "{% endfor %}{% endmacro %}{{ m()|length }}",
            "output",
            "writes more than its output budget",
        ),
        (
            "{% for m in messages %}{% for i in range(100000) %}{{ m.content * 100 }}{% endfor %}"
            "{% endfor %}",
            "output",
            "writes more than its output budget",
        ),
        ("{% macro m(n) %}{{ m(n) }}{% endmacro %}{{ m(1) }}", "iterations", "recurses"),
    ],
)
def test_a_hostile_template_stops_at_the_limit_it_hits(source: str, limit: str, words: str) -> None:
    with pytest.raises(TemplateBudgetExceeded) as err:
        render(source)
    assert err.value.limit == limit
    assert words in err.value.message


def test_the_time_budget_is_checked_while_a_loop_runs() -> None:
    with pytest.raises(TemplateBudgetExceeded) as err:
        render(NESTED_LOOPS, TemplateBudget(seconds=0.0, max_iterations=10**12))
    assert (err.value.limit, err.value.message) == ("time", "ran past its time budget of 0 s")


def test_the_output_budget_is_configurable() -> None:
    assert render("{{ 'x' * 1000 }}", TemplateBudget(max_output_chars=1000)) == "x" * 1000
    with pytest.raises(TemplateBudgetExceeded) as err:
        render("{{ 'x' * 1000 }}{{ 'y' }}", TemplateBudget(max_output_chars=1000))
    assert err.value.message == "writes more than its output budget of 1000 characters"


def test_a_template_over_the_source_limit_is_refused() -> None:
    with pytest.raises(TemplateBudgetExceeded) as err:
        CompiledTemplate("x" * (64 * 1024 + 1))
    assert "over the limit of 65536" in err.value.message


def test_lipsum_is_gone_and_the_sandbox_still_holds() -> None:
    assert render("{{ lipsum is defined }}") == "False"
    with pytest.raises(Exception, match="unsafe"):
        render("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}")


REAL_TEMPLATES = [
    # Features chat templates lean on: loop.last, namespace, macros, tojson, raise.
    "{% set ns = namespace(sys='') %}{% for m in messages %}{% if m.role == 'system' %}"
    "{% set ns.sys = m.content %}{% endif %}{% endfor %}[{{ ns.sys|trim }}]"
    "{% for m in messages if m.role != 'system' %}{{ loop.index0 }}:{{ m.role|upper }}="
    "{{ m.content|tojson }}{% if not loop.last %},{% endif %}{% endfor %}",
    "{% macro say(m) %}<{{ m['role'] }}>{{ m['content'].strip() }}{% endmacro %}"
    "{% for m in messages %}{{ say(m) ~ '\\n' }}{% endfor %}{{ '%s-%d' % ('end', 3) }}",
]


@pytest.mark.models  # the last case renders the built-in chat model's template
@pytest.mark.parametrize("index", range(len(REAL_TEMPLATES) + 1))
def test_real_templates_render_exactly_as_the_plain_sandbox_does(index: int) -> None:
    if index == len(REAL_TEMPLATES):
        chat = next(m for m in builtin_manifests() if m.get("chat_template"))
        source = str(chat["chat_template"])
    else:
        source = REAL_TEMPLATES[index]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    for _, variables in adversarial_conversations(BUDGET):
        expected = plain.from_string(source).render(**variables)
        assert render(source, variables=variables) == expected


def test_the_pool_renders_and_reports_template_errors(pool: RendererPool) -> None:
    assert pool.render("{{ messages[0].content }}!", HELLO, BUDGET) == "Hello!"
    with pytest.raises(TemplateRenderError, match="only user and assistant"):
        pool.render("{{ raise_exception('only user and assistant') }}", HELLO, BUDGET)
    with pytest.raises(TemplateBudgetExceeded) as err:
        pool.render(NESTED_LOOPS, HELLO, BUDGET)
    assert err.value.limit == "iterations"
    assert pool.kills == 0  # stopped from inside: the child lives on
    assert pool.render("{{ 1 + 1 }}", HELLO, BUDGET) == "2"


def test_the_pool_kills_a_child_that_outlives_its_deadline(pool: RendererPool) -> None:
    # The in-render checks are made too generous to fire: only the kill can stop it.
    lax = TemplateBudget(seconds=3600, max_iterations=10**12)
    with pytest.raises(TemplateBudgetExceeded) as err:
        pool.render(NESTED_LOOPS, HELLO, lax, kill_after_s=0.5)
    assert err.value.limit == "time"
    assert pool.kills == 1
    assert pool.render("{{ messages|length }}", HELLO, BUDGET) == "1"  # a fresh child


def test_a_new_childs_start_is_not_part_of_the_renders_deadline(pool: RendererPool) -> None:
    # Starting Python and importing jinja2 takes ~0.2 s, far more on a busy host: counted,
    # it would kill every new child (and the render after each kill is a new child's).
    assert pool.render("ok", HELLO, BUDGET, kill_after_s=0.1) == "ok"
    assert pool.kills == 0


def test_a_child_that_allocates_past_its_memory_limit_fails_alone(pool: RendererPool) -> None:
    lax = TemplateBudget(max_output_chars=10**12)
    with pytest.raises(TemplateBudgetExceeded) as err:
        pool.render("{{ 'x' * 4000000000 }}", HELLO, lax)
    assert err.value.limit == "memory"
    assert pool.render("ok", HELLO, BUDGET) == "ok"


def test_a_process_holding_over_1024_descriptors_still_renders(pool: RendererPool) -> None:
    """A busy gateway holds more than FD_SETSIZE (1024) descriptors, one per client socket:
    a renderer started then gets pipes numbered above it, which select() refuses (the surge
    benchmark's baseline met it as 500s). The pool's children are started and read with
    their pipes above 1024 here."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1200
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    held: list[int] = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        text = pool.render("{{ messages[0].content }}!", HELLO, BUDGET)
        assert text == "Hello!"
        assert pool.render("{{ messages[0].content }}?", HELLO, BUDGET) == "Hello?"
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
