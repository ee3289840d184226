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


def test_report_says_when_a_compared_recipe_did_not_run():
    # e.g. the baseline refused by the preflight's memory plan: no empty "ratio" line
    from phase7fw.cli.benchmark import compare, report_lines

    env = {"device": "NVIDIA H100", "torch": "2.11", "triton": "3.6", "date": "2026-12-07", "cpu": False}
    ran = {"recipe": "a.toml", "tokens_per_s": 100.0, "mfu": 0.3, "peak_memory_gib": 40.0}
    refused = {"recipe": "b.toml", "oom": True, "error": "run 'b' needs about 83.8 GiB of GPU memory"}
    lines = report_lines({"environment": env, "runs": [refused], "compare": compare(ran, refused)})
    assert "b.toml: OUT OF MEMORY (run 'b' needs about 83.8 GiB of GPU memory)" in lines
    assert lines[-1] == "ratio: none (a recipe did not run: see its line above)"
    assert compare(ran, {**ran, "tokens_per_s": 50.0})["tokens_per_s"] == 2.0
