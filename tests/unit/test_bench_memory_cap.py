"""``phase7fw bench --memory-cap-gib``: the cap reaches the CUDA allocator as a fraction of the
card with an explicit device index (torch rejects a bare "cuda" device there)."""

import pytest
import torch

from phase7fw.cli.benchmark import set_memory_cap
from phase7fw.errors import Phase7Error


class _Props:
    total_memory = 140 * 2**30


@pytest.fixture
def fake_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _Props())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda frac, index: calls.append((frac, index)))
    return calls


def test_cap_uses_current_device_index_for_bare_cuda(fake_cuda):
    set_memory_cap(10, torch.device("cuda"))
    assert fake_cuda == [(pytest.approx(10 / 140), 3)]


def test_cap_keeps_an_explicit_index(fake_cuda):
    set_memory_cap(7, torch.device("cuda", 1))
    assert fake_cuda == [(pytest.approx(7 / 140), 1)]


@pytest.mark.parametrize("gib", [0, -1, 141])
def test_cap_outside_the_card_is_refused(fake_cuda, gib):
    with pytest.raises(Phase7Error, match="--memory-cap-gib must be in"):
        set_memory_cap(gib, torch.device("cuda"))
    assert fake_cuda == []


def test_cap_needs_cuda():
    with pytest.raises(Phase7Error, match="needs a CUDA device"):
        set_memory_cap(10, torch.device("cpu"))
