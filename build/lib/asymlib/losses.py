r"""Losses of the report: softmax cross-entropy and the one-vs-all multi-class hinge loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HingeLoss", "get_loss", "LOSSES"]


class HingeLoss(nn.Module):
    r"""One-vs-all multi-class hinge loss on raw scores s (no softmax), as the report's code ran it:

    .. math:: \ell = \frac{1}{NK}\sum_{n,k} \Big[ y_{nk}\,\mathrm{relu}(1 - s_{nk})
              + \frac{1}{K-1}(1 - y_{nk})\,\mathrm{relu}(1 + s_{nk}) \Big],

    y one-hot, K classes. The true class's score is pushed above +1 and every other class's below
    -1, the K-1 wrong classes together weighing as much as the right one. This is the variant in the
    report's code (protocol notes), not Crammer--Singer's :math:`\max(0, 1 + \max_{j\ne y} s_j - s_y)`;
    the captions' "softmax - hingeloss" is not what ran, so no softmax is applied.
    """

    def forward(self, scores: Tensor, target: Tensor) -> Tensor:
        K = scores.shape[1]
        y = F.one_hot(target, K).to(scores.dtype)
        loss = y * F.relu(1 - scores) + (1 - y) * F.relu(1 + scores) / (K - 1)
        return loss.mean()


LOSSES = {"crossentropy": nn.CrossEntropyLoss, "hingeloss": HingeLoss}


def get_loss(name: str) -> nn.Module:
    """``"crossentropy"`` (softmax + categorical cross-entropy) or ``"hingeloss"``."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; accepted: {', '.join(LOSSES)}")
    return LOSSES[key]()
