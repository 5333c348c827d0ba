"""Execution provider choice for a pool's ordered preferences."""

from __future__ import annotations

import logging

import pytest

from workers.runtime.providers import choose_providers

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CANN = "CANNExecutionProvider"
CPU = "CPUExecutionProvider"


@pytest.mark.parametrize(
    ("requested", "available", "providers", "chosen"),
    [
        ([TRT, CUDA, CPU], [TRT, CUDA, CPU], [TRT, CPU], TRT),
        ([TRT, CUDA, CPU], [CUDA, CPU], [CUDA, CPU], CUDA),
        ([CANN, CPU], [CANN, CPU], [CANN, CPU], CANN),
        ([CUDA], [CUDA, CPU], [CUDA, CPU], CUDA),
        ([CUDA, CANN], [CPU], [CPU], CPU),
        ([CPU], [CUDA, CPU], [CPU], CPU),
        ([CPU, CUDA], [CUDA, CPU], [CPU], CPU),
        ([], [CUDA, CPU], [CPU], CPU),
        # A build without CPU in its list still gets CPU as the last resort.
        ([CUDA], [], [CPU], CPU),
    ],
)
def test_choose_providers(
    requested: list[str], available: list[str], providers: list[str], chosen: str
) -> None:
    assert choose_providers(requested, available) == (providers, chosen)


def test_fallback_to_cpu_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="workers.runtime.providers"):
        choose_providers([TRT, CUDA, CPU], [CPU])
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert TRT in record.getMessage() and CUDA in record.getMessage()


@pytest.mark.parametrize(
    ("requested", "available"), [([CUDA, CPU], [CUDA, CPU]), ([CPU], [CPU]), ([CPU, CUDA], [CPU])]
)
def test_deliberate_choice_is_info(
    caplog: pytest.LogCaptureFixture, requested: list[str], available: list[str]
) -> None:
    with caplog.at_level(logging.INFO, logger="workers.runtime.providers"):
        choose_providers(requested, available)
    assert [r.levelno for r in caplog.records] == [logging.INFO]
