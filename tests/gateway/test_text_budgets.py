"""The gateway's tokenizer cache and limits; each organization's share of template renderers."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.test import override_settings
from tokenizers import Tokenizer

from catalog.specs import EndpointSpec
from gateway import text
from gateway.errors import OpenAIError
from tests.workers.test_tokenizer_limits import word_level


def spec_for(location: Path, *, name: str = "tiny", template: str = "") -> EndpointSpec:
    return EndpointSpec(
        id=f"ep_{name}",
        name=name,
        organization_id="org_a",
        active=True,
        model_name=name,
        kind="completion",
        runtime="onnx-causal-lm",
        version_id=f"mv_{name}",
        sha256="0" * 64,
        location=str(location),
        tokenizer_file="tokenizer.json",
        chat_template=template,
        eos_token_ids=(),
        context_length=512,
        max_input_tokens=512,
        dimensions=0,
        pool="cpu",
        queue="q",
        providers=(),
        rpm_limit=0,
        tpm_limit=0,
        created=0,
    )


@pytest.fixture(autouse=True)
def fresh_cache() -> None:
    text.tokenizer_cache().clear()


def tokenizer(tmp_path: Path, name: str, **kwargs: object) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    word_level(directory, **kwargs)  # type: ignore[arg-type]
    return directory


def test_the_cache_evicts_least_recently_used_by_estimated_bytes(tmp_path: Path) -> None:
    loaded = {
        n: Tokenizer.from_file(str(tokenizer(tmp_path, n) / "tokenizer.json")) for n in "abcd"
    }
    cache = text.TokenizerCache(budget_bytes=250)
    cache.put(("a", 0), loaded["a"], 100)
    cache.put(("b", 0), loaded["b"], 100)
    assert cache.get(("a", 0)) is loaded["a"]  # now b is the least recently used
    cache.put(("c", 0), loaded["c"], 100)

    assert cache.keys() == [("a", 0), ("c", 0)]
    assert (cache.total_bytes, cache.get(("b", 0))) == (200, None)
    # One over the whole budget still serves (alone): the request that loaded it needs it.
    cache.put(("d", 0), loaded["d"], 1000)
    assert (cache.keys(), cache.total_bytes) == ([("d", 0)], 1000)


@override_settings(MANTLE_TOKENIZER_CACHE_BYTES=1)
def test_the_gateway_cache_holds_what_its_setting_allows(tmp_path: Path) -> None:
    first, second = spec_for(tokenizer(tmp_path, "a")), spec_for(tokenizer(tmp_path, "b"))
    text.tokenizer_for(first)
    text.tokenizer_for(second)

    assert text.tokenizer_cache().keys() == [(second.location, 0)]
    file_bytes = (Path(second.location) / "tokenizer.json").stat().st_size
    assert text.tokenizer_cache().total_bytes == file_bytes * text.BYTES_PER_FILE_BYTE


@pytest.mark.parametrize(
    ("overrides", "kwargs", "reason"),
    [
        ({"MANTLE_TOKENIZER_MAX_BYTES": 100}, {}, "tokenizer.json is"),
        ({"MANTLE_TOKENIZER_MAX_VOCAB": 5}, {"vocab": 6}, "the vocabulary has 6 tokens"),
        ({}, {"patterns": (r"(a+)+$",)}, "repeats a group that itself repeats"),
    ],
)
def test_a_tokenizer_over_the_limits_is_not_loaded_and_says_why(
    tmp_path: Path, overrides: dict[str, int], kwargs: dict[str, object], reason: str
) -> None:
    spec = spec_for(tokenizer(tmp_path, "t", **kwargs))
    with override_settings(**overrides), pytest.raises(OpenAIError) as err:
        text.tokenizer_for(spec)
    assert (err.value.status, err.value.code) == (400, "tokenizer_rejected")
    assert err.value.message.startswith(
        "model `ep_tiny` can not be served: its tokenizer is over the platform's limits: "
    )
    assert reason in err.value.message
    assert text.tokenizer_cache().keys() == []


@pytest.mark.parametrize("length", [200, 20_000])  # inline, and in a thread
def test_a_regex_engine_panic_is_a_400_not_a_crash(tmp_path: Path, length: int) -> None:
    # A pattern the static check would refuse, put straight in the cache, stands in for
    # one it missed: Oniguruma gives up (a Rust panic) on long runs of "a".
    spec = spec_for(tokenizer(tmp_path, "t", patterns=(r"(a+)+$",)))
    loaded = Tokenizer.from_file(str(Path(spec.location) / "tokenizer.json"))
    text.tokenizer_cache().put((spec.location, 0), loaded, 1)

    with pytest.raises(OpenAIError) as err:
        asyncio.run(text.encode(spec, "a" * length + "b", "prompt"))

    assert (err.value.status, err.value.code, err.value.param) == (
        400,
        "tokenizer_failed",
        "prompt",
    )
    assert "retry-limit-in-match over" in err.value.message


def test_an_organization_gets_at_most_its_share_of_renderers() -> None:
    release = threading.Event()
    started: list[str] = []
    lock = threading.Lock()

    def work(org: str) -> str:
        with lock:
            started.append(org)
        if org == "org_hostile":
            release.wait(10)
        return org

    async def scenario() -> list[str]:
        shares = text.OrganizationShares()
        with ThreadPoolExecutor(4) as pool:
            hostile = [
                asyncio.ensure_future(
                    shares.run("org_hostile", 1, lambda: pool.submit(work, "org_hostile"))
                )
                for _ in range(3)
            ]
            while not started:
                await asyncio.sleep(0.01)
            # The hostile organization's first render holds its only slot; the other
            # organization is served while the hostile ones queue behind their own.
            done = await shares.run("org_b", 1, lambda: pool.submit(work, "org_b"))
            assert started == ["org_hostile", "org_b"]
            release.set()
            return [done, *await asyncio.gather(*hostile)]

    assert asyncio.run(scenario()) == ["org_b", "org_hostile", "org_hostile", "org_hostile"]
    assert started == ["org_hostile", "org_b", "org_hostile", "org_hostile"]
