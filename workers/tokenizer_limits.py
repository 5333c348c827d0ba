"""Limits on a tenant's tokenizer.json: size, vocabulary, and its regular expressions.

A tokenizer is tenant data that the gateway parses and runs on every text request,
holding the GIL while it does (the `tokenizers` library does not release it in
`Tokenizer.from_file` or `encode`). So the file's bytes and vocabulary are capped,
and its regexes (pre-tokenizer and normalizer patterns, run by Oniguruma, a
backtracking engine) are capped in number and length and refused when they repeat
a group that itself repeats or alternates -- `(a+)+`, `(a|a)*`, the shapes behind
catastrophic backtracking. The compile pipeline also runs a timed probe
(`probe_tokenizer`) in a child process it kills at the deadline; the gateway runs
the cheap static checks again when it loads a file (gateway/text.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True)
class TokenizerLimits:
    max_bytes: int = 32 * 1024 * 1024
    """Llama 3's tokenizer.json is 9 MiB, Qwen2.5's 7 MiB; loading one holds the GIL."""
    max_vocab: int = 512 * 1024
    max_patterns: int = 16
    max_pattern_chars: int = 1024

    @classmethod
    def from_env(cls) -> TokenizerLimits:
        def value(name: str, default: int) -> int:
            raw = os.environ.get(name, "").strip()
            return int(raw) if raw else default

        base = cls()
        return cls(
            max_bytes=value("MANTLE_TOKENIZER_MAX_BYTES", base.max_bytes),
            max_vocab=value("MANTLE_TOKENIZER_MAX_VOCAB", base.max_vocab),
            max_patterns=value("MANTLE_TOKENIZER_MAX_PATTERNS", base.max_patterns),
            max_pattern_chars=value("MANTLE_TOKENIZER_MAX_PATTERN_CHARS", base.max_pattern_chars),
        )


class TokenizerRejected(ValueError):
    """A tokenizer over a limit; the message names the limit and how far over it is."""


def check_file_size(path: Path, limits: TokenizerLimits) -> int:
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise TokenizerRejected(
            f"{path.name} is {size} bytes, over the limit of {limits.max_bytes}"
        )
    return size


def check_vocab(size: int, limits: TokenizerLimits) -> None:
    if size > limits.max_vocab:
        raise TokenizerRejected(
            f"the vocabulary has {size} tokens, over the limit of {limits.max_vocab}"
        )


def regex_patterns(component: Any) -> list[str]:
    """Every `{"Regex": ...}` pattern in a tokenizer.json tree (or one component of it)."""
    return list(_walk_patterns(component))


def _walk_patterns(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        pattern = node.get("pattern")
        if isinstance(pattern, dict) and isinstance(pattern.get("Regex"), str):
            yield pattern["Regex"]
        for key, value in node.items():
            if key != "pattern" and key not in {"model", "added_tokens"}:
                yield from _walk_patterns(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_patterns(value)


def check_patterns(patterns: list[str], limits: TokenizerLimits) -> None:
    if len(patterns) > limits.max_patterns:
        raise TokenizerRejected(
            f"the tokenizer has {len(patterns)} regular expressions, over the limit of "
            f"{limits.max_patterns}"
        )
    for pattern in patterns:
        if len(pattern) > limits.max_pattern_chars:
            raise TokenizerRejected(
                f"a pre-tokenizer regular expression is {len(pattern)} characters long, over "
                f"the limit of {limits.max_pattern_chars}"
            )
        problem = nested_repetition(pattern)
        if problem:
            raise TokenizerRejected(
                f"the pre-tokenizer regular expression {pattern[:80]!r} repeats a group that "
                f"{problem}, as (a+)+ or (a|b)* do; such patterns can backtrack catastrophically"
            )


def nested_repetition(pattern: str) -> str | None:
    """Why `pattern` repeats a repeating or alternating group, or None.

    A small scanner, not a full regex parser: escapes and character classes are
    skipped; each group remembers whether it holds a quantifier (`?` included:
    `(a?){25}a{25}` is exponential) or an alternation; a group followed by `*`, `+`,
    `{n,}` or `{n,m}` with m > 1 that holds either is refused. `(...)?` (zero or
    once) is allowed: real tokenizers use it (o200k's `(?i:'s|'t|...)?`).
    """
    # "repeats": holds a quantifier of any kind; "alternates": holds a `|`.
    stack: list[dict[str, bool]] = [{"repeats": False, "alternates": False}]
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            i += 2
            quant, i = _quantifier(pattern, i)
            if quant is not None:
                stack[-1]["repeats"] = True
            continue
        if ch == "[":
            i = _skip_class(pattern, i)
            quant, i = _quantifier(pattern, i)
            if quant is not None:
                stack[-1]["repeats"] = True
            continue
        if ch == "(":
            stack.append({"repeats": False, "alternates": False})
        elif ch == ")" and len(stack) > 1:
            closed = stack.pop()
            if closed["repeats"]:
                stack[-1]["repeats"] = True
            i += 1
            quant, i = _quantifier(pattern, i)
            if quant and (closed["repeats"] or closed["alternates"]):
                return "itself repeats" if closed["repeats"] else "holds alternatives"
            if quant is not None:
                stack[-1]["repeats"] = True
            continue
        elif ch == "|":
            stack[-1]["alternates"] = True
        else:
            i += 1
            quant, i = _quantifier(pattern, i)
            if quant is not None:
                stack[-1]["repeats"] = True
            continue
        i += 1
    return None


def _skip_class(pattern: str, i: int) -> int:
    """The index after the character class that starts at `i` (nested classes allowed)."""
    depth, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "[":
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
            if not depth:
                return i + 1
        i += 1
    return n


def _quantifier(pattern: str, i: int) -> tuple[bool | None, int]:
    """(True if unbounded or repeats more than once, False for `?`/{0,1}, None if none; next)."""
    if i >= len(pattern):
        return None, i
    ch = pattern[i]
    if ch in "*+":
        found: bool | None = True
        i += 1
    elif ch == "?":
        found = False
        i += 1
    elif ch == "{":
        end = pattern.find("}", i)
        body = pattern[i + 1 : end] if end > i else ""
        parts = body.split(",")
        if end < 0 or not all(p.strip().isdigit() or p.strip() == "" for p in parts):
            return None, i + 1  # a literal brace
        if len(parts) == 1:
            found = int(parts[0] or 0) > 1
        else:
            found = parts[1].strip() == "" or int(parts[1]) > 1
        i = end + 1
    else:
        return None, i
    if i < len(pattern) and pattern[i] in "?+":  # lazy or possessive
        i += 1
    return found, i


def check_tokenizer_json(path: Path, limits: TokenizerLimits) -> dict[str, Any]:
    """Size, then vocabulary and patterns of a tokenizer.json; its parsed JSON."""
    check_file_size(path, limits)
    data: Any = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise TokenizerRejected(f"{path.name} is not a JSON object")
    vocab = (data.get("model") or {}).get("vocab")
    size = len(vocab) if isinstance(vocab, (dict, list)) else 0
    check_vocab(size + len(data.get("added_tokens") or []), limits)
    check_patterns(
        regex_patterns(data.get("pre_tokenizer")) + regex_patterns(data.get("normalizer")),
        limits,
    )
    return data


# --- the timed probe ---------------------------------------------------------------------

PROBE_CHARS = (" ", "a", "A", "0", "\n", "\t", "'", ".", "-", "é", "中", "\u200b", "!")


def probe_inputs(length: int = 4096) -> list[str]:
    """Long runs of one character class, then a different one: where backtracking explodes."""
    out = []
    for ch in PROBE_CHARS:
        out.append(ch * length)
        out.append(ch * length + "\x00")
        out.append((ch + " ") * (length // 2))
    out.append("".join(PROBE_CHARS) * (length // len(PROBE_CHARS)))
    return out


def probe_tokenizer(path: Path, seconds: float) -> None:
    """Tokenizes `probe_inputs()` in a child process; refuses a tokenizer that is not done
    within `seconds` or whose regex engine gives up (Oniguruma's backtracking limit)."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
        "from workers.tokenizer_limits import _probe_child; _probe_child(sys.argv[1])"
    )
    try:
        done = subprocess.run(  # noqa: S603 (our own interpreter and code)
            [sys.executable, "-I", "-c", code, str(path)],
            capture_output=True,
            timeout=seconds,
            env={"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"},
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise TokenizerRejected(
            f"tokenizing adversarial text (long runs of one character) took over {seconds:g} s; "
            "a pre-tokenizer regular expression backtracks catastrophically"
        ) from None
    if done.returncode != 0:
        detail = done.stdout.decode(errors="replace").strip().splitlines()
        raise TokenizerRejected(
            "tokenizing adversarial text failed: "
            + (detail[-1] if detail else f"exit status {done.returncode}")
        )


def _probe_child(path: str) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(path)
    for text in probe_inputs():
        try:
            tokenizer.encode(text, add_special_tokens=False)
        except BaseException as exc:  # a Rust panic is a BaseException
            sys.stdout.write(f"{type(exc).__name__}: {str(exc)[:200]}\n")
            raise SystemExit(1) from None
