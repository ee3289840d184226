"""phase7fw.kernels.verify reports every kernel: a check that raises is one failed row that
names the kernel and the error, and the other kernels are still checked."""

import torch

from phase7fw.kernels import verify as V


class _Broken:
    """An op's checks that fail: each case raises (a case number tells them apart)."""

    def verify_cases(self, device, quick):
        def case(n):
            def run():
                raise RuntimeError(f"out of shared memory in case {n}\nsecond line")
            return run

        return [case(n) for n in range(6)]

    def smoke_rows(self, device):
        raise ValueError("bad launch")


def test_verify_names_the_failed_kernel_and_keeps_the_case_order(monkeypatch):
    monkeypatch.setattr(V, "_module", lambda op: _Broken())
    rows = V.verify(torch.device("cpu"), only=[3, 4, 6, 7, 12])
    assert [(r.op, r.ok, r.detail) for r in rows] == [
        ("hyperbolic_attention", False, "RuntimeError: out of shared memory in case 3"),
        ("ar_ssm_scan", False, "RuntimeError: out of shared memory in case 0"),
        ("rmsnorm", False, "RuntimeError: out of shared memory in case 0"),
        ("swiglu", False, "RuntimeError: out of shared memory in case 0"),
        ("hyperbolic_attention", False, "RuntimeError: out of shared memory in case 5"),
    ]


def test_every_case_of_every_op_is_in_the_order():
    """tests/gpu runs verify() case by case by index: each op's cases appear once each."""
    import importlib

    want = sorted((op, n) for op in V.OPS
                  for n in range(len(importlib.import_module(f"phase7fw.kernels.{op}.verify").verify_cases(torch.device("cpu")))))
    assert sorted(V.ORDER) == want and len(set(V.ORDER)) == len(V.ORDER)


def test_smoke_reports_every_kernel_when_all_fail(monkeypatch):
    monkeypatch.setattr(V, "_module", lambda op: _Broken())
    rows = V.smoke(torch.device("cpu"))
    assert [r.op for r in rows] == list(V.OPS)
    assert [r.detail for r in rows] == ["ValueError: bad launch"] * len(V.OPS)
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
