r"""Optimizers of the report and of Liao et al. 2016, and §5's clipping of asymmetric gradients."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from .layers import feedback_layers

__all__ = ["BatchManhattan", "make_optimizer", "clip_asymmetric_grads", "OPTIMIZERS", "DEFAULT_LR"]


class BatchManhattan(torch.optim.Optimizer):
    r"""Batch Manhattan (Liao, Leibo & Poggio 2016): only the sign of the batch gradient is used,

    .. math:: v_{t+1} = \mu\, v_t - \eta\,\mathrm{sign}(g_t + \lambda\theta_t), \qquad
              \theta_{t+1} = \theta_t + v_{t+1},

    with momentum μ (0 by default: :math:`\theta \leftarrow \theta - \eta\,\mathrm{sign}(g)`)
    and optional weight decay λ inside the sign.
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, momentum: float = 0.0,
                 weight_decay: float = 0.0):
        if not lr > 0:
            raise ValueError(f"BatchManhattan: lr must be > 0, got {lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"BatchManhattan: momentum must be in [0, 1), got {momentum!r}")
        if not weight_decay >= 0:
            raise ValueError(f"BatchManhattan: weight_decay must be >= 0, got {weight_decay!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad if wd == 0 else p.grad + wd * p
                step = torch.sign(g).mul_(-lr)
                if mu:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                    step = buf.mul_(mu).add_(step)
                p.add_(step)
        return loss


#: The report's learning rates (Lasagne defaults, protocol notes); BM's is this book's choice.
DEFAULT_LR = {"adam": 1e-3, "sgd": 1e-2, "nesterov": 1e-2, "bm": 1e-4}
OPTIMIZERS = tuple(DEFAULT_LR)


def make_optimizer(name: str, params: Iterable[Tensor], lr: float | None = None,
                   momentum: float = 0.9, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``adam`` (β=(0.9, 0.999), ε=1e-8), ``sgd``, ``nesterov`` (momentum 0.9) or ``bm``.

    ``lr=None`` takes :data:`DEFAULT_LR`. ``momentum`` is used by nesterov (and not by sgd or bm).
    """
    key = name.lower()
    if key not in DEFAULT_LR:
        raise ValueError(f"unknown optimizer {name!r}; accepted: {', '.join(OPTIMIZERS)}")
    lr = DEFAULT_LR[key] if lr is None else lr
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"learning rate must be > 0, got {lr!r}")
    params = list(params)
    # torch's fused kernels: one pass over all parameters per step (the default loops tensor by tensor
    # on the CPU); they agree with the loop to rounding
    fused = {"fused": True} if params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                                              for p in params) else {}
    if key == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, **fused)
    if key == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, **fused)
    if key == "nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay,
                               **fused)
    return BatchManhattan(params, lr=lr, weight_decay=weight_decay)


@torch.no_grad()
def clip_asymmetric_grads(model: nn.Module, clip: float) -> int:
    r"""Report §5: clamp :math:`\nabla_W = G^\top h` to :math:`[-c, c]` in every layer whose
    feedback is asymmetric (rule other than ``bp``), and the gradient of a learned B with it.

    Call between ``loss.backward()`` and ``optimizer.step()``. Returns the number of tensors clipped.
    """
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip!r}")
    n = 0
    for _, layer in feedback_layers(model):
        if not layer.rule.asymmetric:
            continue
        for p in (layer.weight, *layer.rule.feedback_params(layer)):
            if p.grad is not None:
                p.grad.clamp_(-clip, clip)
                n += 1
    return n
