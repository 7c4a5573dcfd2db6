r"""Deep networks for the scaling chapters: ResNets, an AlexNet-style net and plain conv nets of any
depth, with any feedback rule.

Each is written once in plain ``torch.nn`` and turned into a feedback network by
:func:`asymlib.convert.convert`, which swaps every ``nn.Conv2d``/``nn.Linear`` for asymlib's layer
with the rule; batch norm, pooling and the residual additions keep exact backprop.

    resnet(18, rule="usf")                  # ResNet-18, CIFAR stem (3x3 conv, no max pool)
    resnet(18, rule="fa", stem="imagenet")  # 7x7/2 conv + max pool, for 224x224 images
    resnet(20, rule="dfa")                  # He et al.'s CIFAR ResNet-20 (6n+2 layers, widths 16-32-64)
    alexnet(rule="usf", keep_last_bp=True)  # AlexNet-style, with batch norm
    plain_convnet(6, width=32, rule="fa")   # 6 conv layers + a classifier: the depth sweep
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn

from .convert import RuleChoice, convert

__all__ = ["resnet", "alexnet", "plain_convnet", "named_model", "BasicBlock", "ResNet", "RESNET_STAGES"]

#: blocks per stage of the ImageNet-family ResNets (He et al. 2016)
RESNET_STAGES = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
STEMS = ("cifar", "imagenet")


class BasicBlock(nn.Module):
    r"""Two 3x3 convs with batch norm: :math:`y = \mathrm{relu}(F(x) + S(x))`, S the identity, or a
    1x1 conv + batch norm (projection) when the block changes the width or the resolution."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (nn.Sequential() if stride == 1 and c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, stages of :class:`BasicBlock` (the first block of every stage after the first halves
    the resolution), global average pooling, one linear classifier ``fc``."""

    def __init__(self, blocks: Sequence[int], widths: Sequence[int], num_classes: int = 10,
                 stem: str = "cifar", in_channels: int = 3):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
        w0 = widths[0]
        self.stem = (nn.Sequential(nn.Conv2d(in_channels, w0, 3, 1, 1, bias=False), nn.BatchNorm2d(w0), nn.ReLU())
                     if stem == "cifar" else
                     nn.Sequential(nn.Conv2d(in_channels, w0, 7, 2, 3, bias=False), nn.BatchNorm2d(w0), nn.ReLU(),
                                   nn.MaxPool2d(3, 2, 1)))
        layers, c = [], w0
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                layers.append(BasicBlock(c, w, 2 if (j == 0 and i > 0) else 1))
                c = w
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))))


def _finish(net: nn.Module, rule: RuleChoice, keep_last_bp: bool, in_channels: int, in_size: int) -> nn.Module:
    example = torch.zeros(2, in_channels, in_size, in_size)
    return convert(net, rule, keep_last_bp=keep_last_bp, example_input=example, inplace=True)


def resnet(depth: int = 18, num_classes: int = 10, rule: RuleChoice = "bp", *, stem: str = "cifar",
           width: int | None = None, keep_last_bp: bool = False, in_channels: int = 3,
           in_size: int | None = None) -> nn.Module:
    """A ResNet with feedback rule ``rule`` in every conv and in ``fc``.

    ``depth`` 10, 18 or 34: the ImageNet family (stages of widths w, 2w, 4w, 8w, w = 64), with the
    ``cifar`` stem (3x3 conv, stride 1) or the ``imagenet`` stem (7x7/2 conv + 3x3/2 max pool).
    ``depth = 6n + 2`` (20, 32, 44, 56, 110): He et al.'s CIFAR ResNets, 3 stages of n blocks,
    widths w, 2w, 4w with w = 16, projection shortcuts. ``width`` replaces w (small-width sweeps).
    ``in_size`` (32 for the cifar stem, 224 for imagenet, by default) sizes DFA's matrices.
    """
    if depth in RESNET_STAGES:
        w = width or 64
        net = ResNet(RESNET_STAGES[depth], (w, 2 * w, 4 * w, 8 * w), num_classes, stem, in_channels)
    elif isinstance(depth, int) and depth >= 8 and (depth - 2) % 6 == 0:
        if stem != "cifar":
            raise ValueError(f"ResNet-{depth} (6n+2, the CIFAR family) has only the cifar stem")
        w = width or 16
        net = ResNet((((depth - 2) // 6),) * 3, (w, 2 * w, 4 * w), num_classes, stem, in_channels)
    else:
        raise ValueError(f"ResNet depth must be one of {', '.join(map(str, RESNET_STAGES))} (ImageNet family) "
                         f"or 6n+2 >= 8 (CIFAR family: 20, 32, 44, 56, 110), got {depth!r}")
    return _finish(net, rule, keep_last_bp, in_channels, in_size or (32 if stem == "cifar" else 224))


def alexnet(num_classes: int = 10, rule: RuleChoice = "bp", *, stem: str = "cifar", width: float = 1.0,
            keep_last_bp: bool = False, in_channels: int = 3, in_size: int | None = None) -> nn.Module:
    """AlexNet-style with batch norm after every conv and hidden dense layer (as Xiao et al. 2018 trained
    it): five convs (64, 192, 384, 256, 256 channels, times ``width``), three max pools, two hidden
    dense layers (4096 for the ``imagenet`` stem: 11x11/4 first conv, 6x6 adaptive pooling;
    1024 for ``cifar``: 5x5/1 first conv, 32x32 inputs -> 4x4), then the classifier."""
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
    c = [max(1, round(width * k)) for k in (64, 192, 384, 256, 256)]
    fc = max(1, round(width * (4096 if stem == "imagenet" else 1024)))
    cbr = lambda i, o, k, s, p: [nn.Conv2d(i, o, k, s, p, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
    first = cbr(in_channels, c[0], 11, 4, 2) if stem == "imagenet" else cbr(in_channels, c[0], 5, 1, 2)
    pool_out = 6 if stem == "imagenet" else 4
    net = nn.Sequential(
        *first, nn.MaxPool2d(3, 2, 1 if stem == "cifar" else 0),
        *cbr(c[0], c[1], 5, 1, 2), nn.MaxPool2d(3, 2, 1 if stem == "cifar" else 0),
        *cbr(c[1], c[2], 3, 1, 1), *cbr(c[2], c[3], 3, 1, 1), *cbr(c[3], c[4], 3, 1, 1),
        nn.MaxPool2d(3, 2, 1 if stem == "cifar" else 0), nn.AdaptiveAvgPool2d(pool_out), nn.Flatten(),
        nn.Linear(c[4] * pool_out ** 2, fc, bias=False), nn.BatchNorm1d(fc), nn.ReLU(),
        nn.Linear(fc, fc, bias=False), nn.BatchNorm1d(fc), nn.ReLU(),
        nn.Linear(fc, num_classes))
    return _finish(net, rule, keep_last_bp, in_channels, in_size or (32 if stem == "cifar" else 224))


def plain_convnet(depth: int, width: int = 32, num_classes: int = 10, rule: RuleChoice = "bp", *,
                  keep_last_bp: bool = False, in_channels: int = 3, in_size: int = 32) -> nn.Module:
    """``depth`` 3x3 convs (conv - BN - ReLU, no shortcut), the width doubling and the resolution
    halving (2x2 max pool) after every second conv, then global average pooling and a linear classifier:
    ``depth + 1`` weight layers."""
    if not (isinstance(depth, int) and depth >= 1):
        raise ValueError(f"depth must be an int >= 1, got {depth!r}")
    mods, c, w, size = [], in_channels, width, in_size
    for i in range(depth):
        mods += [nn.Conv2d(c, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        c = w
        if i % 2 == 1 and i < depth - 1 and size >= 4:
            mods.append(nn.MaxPool2d(2))
            size //= 2
            w *= 2
    net = nn.Sequential(*mods, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
    return _finish(net, rule, keep_last_bp, in_channels, in_size)


_NAMED = re.compile(r"^(?:(?P<resnet>resnet-?(?P<depth>\d+))|(?P<alexnet>alexnet)|plain-?(?P<pdepth>\d+)x(?P<pwidth>\d+))"
                    r"(?:/(?P<stem>cifar|imagenet))?(?:@(?P<width>\d+(?:\.\d+)?))?$")


def named_model(name: str):
    """``"resnet18"``, ``"resnet20"``, ``"resnet18/imagenet"``, ``"resnet18@16"`` (base width 16),
    ``"alexnet"``, ``"alexnet@0.5"``, ``"plain6x32"``: a factory ``(in_shape, num_classes, rule,
    keep_last_bp) -> model``, or None when ``name`` is not a model name (then it is a layer spec)."""
    m = _NAMED.match(name.strip().lower()) if isinstance(name, str) else None
    if m is None:
        return None
    stem, width = m["stem"] or "cifar", m["width"]

    def factory(in_shape, num_classes, rule, keep_last_bp):
        if len(in_shape) != 3 or in_shape[1] != in_shape[2]:
            raise ValueError(f"model {name!r} needs square images (C, H, H), got input shape {tuple(in_shape)}")
        kw = dict(rule=rule, keep_last_bp=keep_last_bp, in_channels=in_shape[0], in_size=in_shape[1])
        if m["resnet"]:
            return resnet(int(m["depth"]), num_classes, stem=stem, width=int(float(width)) if width else None, **kw)
        if m["alexnet"]:
            return alexnet(num_classes, stem=stem, width=float(width or 1.0), **kw)
        return plain_convnet(int(m["pdepth"]), int(m["pwidth"]), num_classes, **kw)
    return factory
