r"""Alignment metrics, per feedback layer.

* ``angle_BW``: the angle between B and W, :math:`\arccos \frac{\langle B, W\rangle}{\|B\|\|W\|}`
  in degrees (NaN when B and W differ in shape, as for DFA);
* ``angle_delta``: the angle between the delta the rule sends to the layer's output,
  :math:`G_l = \partial L/\partial a_l`, and backprop's true :math:`G_l` on the same batch with the
  same weights (Lillicrap et al. 2016's measure), flattened over the batch;
* ``sign_concordance``: fraction of entries with :math:`\mathrm{sign}\,B = \mathrm{sign}\,W`;
* ``norm_ratio``: :math:`\|B\|/\|W\|`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .layers import exact_backprop, feedback_layers

__all__ = ["angle", "weight_alignment", "delta_alignment", "alignment"]


def angle(a: Tensor, b: Tensor) -> float:
    r"""Angle in degrees between two tensors seen as vectors; NaN if shapes differ or one is 0."""
    if a.shape != b.shape:
        return math.nan
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return math.nan
    return math.degrees(math.acos(float((a @ b / (na * nb)).clamp(-1, 1))))


@torch.no_grad()
def weight_alignment(model: nn.Module) -> dict[str, dict[str, float]]:
    """``{layer: {angle_BW, sign_concordance, norm_ratio}}`` for every feedback layer."""
    out = {}
    for name, layer in feedback_layers(model):
        W, B = layer.weight.detach(), layer.B
        same = W.shape == B.shape
        out[name] = {
            "angle_BW": angle(B, W),
            "sign_concordance": float((torch.sign(B) == torch.sign(W)).double().mean()) if same else math.nan,
            "norm_ratio": float(B.norm() / W.norm()) if same else math.nan,
        }
    return out


def _output_deltas(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    layers = list(feedback_layers(model))
    outs: dict[str, Tensor] = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, n=name: outs.__setitem__(n, o))
             for name, layer in layers]
    try:
        loss = loss_fn(model(x), y)
    finally:
        for h in hooks:
            h.remove()
    names = list(outs)
    grads = torch.autograd.grad(loss, [outs[n] for n in names])
    return dict(zip(names, grads))


def delta_alignment(model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    r"""``{layer: angle between the rule's G_l and backprop's G_l}`` on the batch ``(x, y)``.

    Runs the model twice in eval mode (batch-norm statistics and brSF draws untouched); no
    parameter gradient is accumulated.
    """
    was_training = model.training
    model.eval()
    try:
        rule_d = _output_deltas(model, loss_fn, x, y)
        with exact_backprop(model):
            true_d = _output_deltas(model, loss_fn, x, y)
    finally:
        model.train(was_training)
    return {n: angle(rule_d[n], true_d[n]) for n in rule_d}


def alignment(model: nn.Module, loss_fn: nn.Module | None = None, x: Tensor | None = None,
              y: Tensor | None = None) -> dict[str, dict[str, float]]:
    """All metrics per layer; ``angle_delta`` only when a batch is given."""
    out = weight_alignment(model)
    if x is not None:
        for name, a in delta_alignment(model, loss_fn, x, y).items():
            out[name]["angle_delta"] = a
    return out
