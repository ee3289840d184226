"""phase7fw.kernels.verify reports every kernel: a check that raises is one failed row that
names the kernel and the error, and the other kernels are still checked."""

import torch

from phase7fw.kernels import verify as V


class _Broken:
    def verify_rows(self, device, quick):
        raise RuntimeError("out of shared memory\nsecond line")

    def smoke_rows(self, device):
        raise ValueError("bad launch")


def test_verify_names_the_failed_kernel(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("triton missing")

    monkeypatch.setattr(V, "_module", lambda op: _Broken())
    monkeypatch.setattr(V, "_check_ssm", boom)
    rows = V.verify(torch.device("cpu"), only=[4, 6, 7])
    assert [(r.op, r.ok, r.detail) for r in rows] == [
        ("ar_ssm_scan", False, "RuntimeError: triton missing"),
        ("rmsnorm", False, "RuntimeError: out of shared memory"),
        ("swiglu", False, "RuntimeError: out of shared memory"),
    ]


def test_smoke_reports_every_kernel_when_all_fail(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("triton missing")

    monkeypatch.setattr(V, "_module", lambda op: _Broken())
    monkeypatch.setattr(V, "_check_attention", boom)
    monkeypatch.setattr(V, "_check_ssm", boom)
    rows = V.smoke(torch.device("cpu"))
    assert [r.op for r in rows] == ["hyperbolic_attention", "ar_ssm_scan", *V.SELF_CHECKING]
    assert [r.detail for r in rows] == ["RuntimeError: triton missing"] * 2 + ["ValueError: bad launch"] * len(V.SELF_CHECKING)
    assert not any(r.ok for r in rows)
    assert all(r.ms["first_call_incl_compile"] >= 0 for r in rows)


def test_gated_row_needs_finite_outputs_errors_within_the_gate_and_the_extra_condition():
    good, bad = torch.ones(3), torch.tensor([1.0, float("nan")])
    assert V.gated_row("op", "c", {"out": V.GATE}, (good,)).ok
    row = V.gated_row("op", "c", {"out": 0.0}, (good, bad))
    assert (row.ok, row.detail) == (False, "NaN/Inf")
    assert not V.gated_row("op", "c", {"out": 0.0, "dx": 1.01 * V.GATE}, (good,)).ok
    row = V.gated_row("op", "c", {"out": 0.0}, (good,), ok=False)
    assert (row.ok, row.detail) == (False, "")
