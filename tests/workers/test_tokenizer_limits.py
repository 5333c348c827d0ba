"""Limits on tenant tokenizers: bytes, vocabulary, regex count, length and shape, timed probe."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

from tests.support.stack import builtin_manifests
from workers.tokenizer_limits import (
    TokenizerLimits,
    TokenizerRejected,
    check_tokenizer_json,
    nested_repetition,
    probe_tokenizer,
)

LIMITS = TokenizerLimits()


def word_level(directory: Path, *, vocab: int = 3, patterns: tuple[str, ...] = (r"\s+",)) -> Path:
    """A small tokenizer.json built with the tokenizers library, split by `patterns`."""
    words = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(vocab - 1)}}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns]
    )
    path = directory / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.mark.parametrize(
    "pattern",
    [
        # GPT-2, Llama 3 / cl100k, o200k: what real tokenizers ship.
        r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}|\s+(?!\S)|\s+",
        r"(\d{1,3}(,\d{3})?)",
        r"\(+\)+",
        r"[(a+)+]",
    ],
)
def test_real_tokenizer_patterns_pass(pattern: str) -> None:
    assert nested_repetition(pattern) is None


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (r"(a+)+$", "itself repeats"),
        (r"(a*)*b", "itself repeats"),
        (r"(?:x+x+)+y", "itself repeats"),
        (r"(\w+\s?)*$", "itself repeats"),
        (r"(a?){25}a{25}", "itself repeats"),
        (r"(a|a)*", "holds alternatives"),
        (r"(a|b){2,}", "holds alternatives"),
    ],
)
def test_patterns_that_can_backtrack_catastrophically_are_refused(pattern: str, why: str) -> None:
    assert nested_repetition(pattern) == why


def test_a_tokenizer_over_the_byte_limit_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text("{" + " " * 2000)  # not even JSON: the size is checked first
    with pytest.raises(TokenizerRejected) as err:
        check_tokenizer_json(path, TokenizerLimits(max_bytes=1000))
    assert str(err.value) == "tokenizer.json is 2001 bytes, over the limit of 1000"


def test_a_vocabulary_over_the_limit_is_refused(tmp_path: Path) -> None:
    path = word_level(tmp_path, vocab=50)
    with pytest.raises(TokenizerRejected) as err:
        check_tokenizer_json(path, TokenizerLimits(max_vocab=49))
    assert str(err.value) == "the vocabulary has 50 tokens, over the limit of 49"
    check_tokenizer_json(path, TokenizerLimits(max_vocab=50))


def test_too_many_or_too_long_patterns_are_refused(tmp_path: Path) -> None:
    many = word_level(tmp_path, patterns=tuple(f"x{i}" for i in range(17)))
    with pytest.raises(TokenizerRejected, match="17 regular expressions, over the limit of 16"):
        check_tokenizer_json(many, LIMITS)
    long = word_level(tmp_path, patterns=("a" * 1025,))
    with pytest.raises(TokenizerRejected, match="1025 characters long, over the limit of 1024"):
        check_tokenizer_json(long, LIMITS)


def test_a_normalizer_pattern_is_checked_too(tmp_path: Path) -> None:
    path = word_level(tmp_path)
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.normalizer = normalizers.Replace(Regex(r"(a+)+$"), "")
    tokenizer.save(str(path))
    with pytest.raises(TokenizerRejected, match=r"'\(a\+\)\+\$' repeats a group"):
        check_tokenizer_json(path, LIMITS)


def test_the_probe_refuses_a_tokenizer_whose_regex_engine_gives_up(tmp_path: Path) -> None:
    path = word_level(tmp_path, patterns=(r"(a+)+$",))  # the static check is bypassed here
    with pytest.raises(TokenizerRejected) as err:
        probe_tokenizer(path, seconds=60)
    assert "retry-limit-in-match" in str(err.value)


@pytest.mark.models
def test_the_built_in_tokenizers_pass_every_check() -> None:
    for manifest in builtin_manifests():
        path = Path(manifest["location"]) / "tokenizer.json"
        check_tokenizer_json(path, LIMITS)
        probe_tokenizer(path, seconds=60)
