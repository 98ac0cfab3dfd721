"""Where the model runs: the device is checked against the machine, the timeout against sense."""

from datetime import timedelta

import pytest
import torch

from llama.runtime import check_device, choose_runtime, collective_timeout


def test_a_device_the_machine_lacks_is_refused_naming_what_there_is() -> None:
    assert check_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device 'cuda' is not available: .*; use one of cpu$"):
            choose_runtime("cuda")
    with pytest.raises(ValueError, match=r"device 'mps' is not supported: use one of cpu"):
        check_device("mps")
    with pytest.raises(ValueError, match=r"unknown device 'gpu': use one of cpu"):
        check_device("gpu")


@pytest.mark.parametrize(("value", "seconds"), [(None, 300.0), ("2.5", 2.5), ("600", 600.0)])
def test_the_collective_timeout_is_a_setting(
    monkeypatch: pytest.MonkeyPatch, value: str | None, seconds: float
) -> None:
    if value is None:
        monkeypatch.delenv("LLAMA_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("LLAMA_TIMEOUT", value)
    assert collective_timeout() == timedelta(seconds=seconds)


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf", "nan"])
def test_a_senseless_timeout_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("LLAMA_TIMEOUT", value)
    with pytest.raises(ValueError, match=f"LLAMA_TIMEOUT='{value}': give the seconds a process may wait for a peer"):
        collective_timeout()
