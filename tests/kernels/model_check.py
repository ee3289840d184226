"""Shared by the tests that put kernels inside a whole model: one training step of the model
with kernels must give the torch reference model's loss and gradients."""

import torch


def assert_same_loss_and_grads(ref, fast, ids, prepare=lambda model: None) -> None:
    """One step on ``ids`` (next-token targets): ``fast`` (same weights as ``ref``, kernels
    selected) gives ``ref``'s loss within 1e-5 and each parameter's gradient within 1e-4
    relative (the same parameters get none). ``prepare(model)`` runs first on each model."""
    targets = torch.roll(ids, -1, dims=1)
    losses = []
    for model in (ref, fast):
        prepare(model)
        model.begin_step()
        loss, _ = model.loss(ids, targets)
        loss.backward()
        model.finish_backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-5), losses
    ref_grads = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        g_ref = ref_grads[name].grad
        assert (p.grad is None) == (g_ref is None), name
        if g_ref is not None:
            err = (p.grad - g_ref).norm() / g_ref.norm().clamp_min(1e-12)
            assert err < 1e-4, (name, float(err))
