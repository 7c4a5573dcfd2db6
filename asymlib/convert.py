r"""Bring your own network: swap the ``nn.Conv2d`` and ``nn.Linear`` layers of any torch model
(a torchvision ResNet, your own module) for asymlib's feedback layers.

    model = convert(torchvision.models.resnet18(num_classes=10), "usf", keep_last_bp=True)

Each swapped layer keeps W and b (copied) and gets its own instance of the rule; everything else
(batch norm, pooling, residual additions) stays and keeps exact backprop. With rule ``bp`` the
converted model computes the same function and the same gradients as the original (tested).
"""
from __future__ import annotations

import copy
from typing import Callable, Union

import torch
from torch import Tensor, nn

from .layers import Conv2d, FeedbackLayer, Linear
from .rules import FeedbackRule, is_direct, resolve_rules

__all__ = ["convert", "RuleChoice"]

#: a rule name or object for every layer, or ``(qualified name, original module) -> rule``
RuleChoice = Union[str, FeedbackRule, None, Callable[[str, nn.Module], Union[str, FeedbackRule, None]]]


def _swappable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if type(m) in (nn.Conv2d, nn.Linear) and not isinstance(m, FeedbackLayer)]


def _probe(model: nn.Module, example_input: Tensor, names: list[str]) -> tuple[dict[str, tuple], int]:
    """Spatial size of the input of every named layer, and the number of outputs, from one forward
    pass in eval mode (batch-norm statistics untouched)."""
    sizes, mods = {}, dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, tuple(i[0].shape[2:])))
             for n in names]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(example_input)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return sizes, int(out.shape[1])


def _feedback_layer(name: str, m: nn.Module, rule: FeedbackRule, input_size) -> FeedbackLayer:
    bias = m.bias is not None
    if isinstance(m, nn.Linear):
        new = Linear(m.in_features, m.out_features, bias=bias, rule=rule)
    else:
        problems = [f"{k}={v}" for k, v, ok in (("groups", m.groups, 1), ("dilation", m.dilation, (1, 1)),
                                                ("padding_mode", m.padding_mode, "zeros")) if v != ok]
        if problems:
            raise ValueError(f"convert: layer {name!r} has {', '.join(problems)}; asymlib.Conv2d supports "
                             "groups=1, dilation=1 and padding_mode='zeros' only")
        new = Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, bias=bias, rule=rule,
                     input_size=input_size)
    with torch.no_grad():
        new.weight.copy_(m.weight)
        if bias:
            new.bias.copy_(m.bias)
    return new.to(device=m.weight.device, dtype=m.weight.dtype)


def convert(model: nn.Module, rule: RuleChoice = "bp", *, keep_last_bp: bool = False,
            example_input: Tensor | None = None, inplace: bool = False) -> nn.Module:
    """Replace every ``nn.Conv2d`` and ``nn.Linear`` of ``model`` by a feedback layer.

    Args:
        model: any ``nn.Module``; copied first unless ``inplace``.
        rule: a rule for every layer (``"fa"``, ``"usf"``, ``"psf(0.75)"``, a rule object), or a
            function ``(qualified name, original module) -> rule`` choosing per layer.
        keep_last_bp: the last swapped layer (in ``named_modules`` order: the classifier of
            torchvision's nets) stays ``bp``.
        example_input: one input batch; needed by ``dfa``, whose matrices are sized by each conv's
            input. With ``dfa`` the returned model is ``nn.Sequential(model, error tap)``.

    Returns:
        the converted model (``model`` itself if ``inplace``).
    """
    if type(model) in (nn.Conv2d, nn.Linear):
        raise ValueError("convert: the model is itself a Conv2d/Linear; wrap it in nn.Sequential")
    model = model if inplace else copy.deepcopy(model)
    targets = _swappable(model)
    if not targets:
        raise ValueError("convert: the model has no nn.Conv2d or nn.Linear layer to swap")
    mods = dict(targets)
    per_layer = (lambda name: rule(name, mods[name])) if callable(rule) and not isinstance(rule, FeedbackRule) else rule
    names = [name for name, _ in targets]
    choices = {n: (per_layer(n) if callable(per_layer) and not isinstance(per_layer, FeedbackRule) else per_layer)
               for n in names}
    sizes, num_classes = {}, None
    if any(is_direct(c) for i, c in enumerate(choices.values()) if not (keep_last_bp and i == len(names) - 1)):
        if example_input is None:
            raise ValueError("convert: rule 'dfa' needs example_input (one input batch) to size each "
                             "layer's feedback matrix")
        sizes, num_classes = _probe(model, example_input, names)
    plan = resolve_rules(names, lambda n: choices[n], keep_last_bp=keep_last_bp, num_classes=num_classes)
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _feedback_layer(name, m, plan.rules[name], sizes.get(name)))
    dfa = plan.dfa
    return nn.Sequential(model, dfa.tap()) if dfa is not None else model
