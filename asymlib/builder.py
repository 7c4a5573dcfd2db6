"""``build``: networks from the report's own notation.

Grammar (tokens separated by `` - ``; case does not matter; markdown escapes ``\\*`` are read as ``*``;
a leading ``NAME:`` label and a trailing ``.`` are ignored)::

    Input                       optional first token
    dense<N>                    Linear to N units (+ ReLU unless it is the last layer)
    Conv<kh>*<kw>*<C>/<s>       convolution, C filters, stride s (default 1) (+ ReLU)
    Untied<kh>*<kw>*<C>/<s>     untied (locally connected) convolution, the report's §4 (+ ReLU)
    Maxpool<kh>*<kw>/<s>        max pooling, padding kh//2
    Avgpool<kh>*<kw>/<s>        average pooling, padding kh//2 counted in the average
    softmax                     accepted and ignored (cross-entropy includes it; hinge runs on scores)
    crossentropy | hingeloss    the loss returned with the model

Marks in parentheses after a layer token: ``(R)`` and ``(R*)`` (mapped by ``rules``, default
R → ``fa``, R* → ``fa-updated``), any rule name (``(usf)``, ``(psf(0.25))``), and for convs a padding
``(same)``, ``(valid)`` or ``(p<n>)``. ``dense10(R)(...)`` may carry several marks.

Conventions (the report's code, see the protocol notes): no biases, Glorot-uniform W and B, ReLU,
tied convs padded ``same, same, valid`` (:data:`REPORT_CONV_PADDING`, which gives Poggio's net its
64·2·2 = 256 features into dense128), untied convs padded 2 (``same``), pooling padded 1.
A max pool right after a layer's ReLU is put before it (``Conv - MaxPool - ReLU``): the two commute,
so the network computes the same function and the same gradients, with the ReLU on the pooled values
(in Poggio's net a quarter as many; its bf16 channels-last step gets that much cheaper).
"""
from __future__ import annotations

import re
from typing import Mapping, NamedTuple, Sequence

from torch import nn

from .layers import Conv2d, FeedbackLayer, Linear, LocallyConnected2d, feedback_layers
from .losses import get_loss
from .models import named_model
from .rules import FeedbackRule, is_direct, resolve_rules

__all__ = ["build", "Network", "FeedbackNet", "parse_spec", "REPORT_CONV_PADDING", "DEFAULT_MARKS"]

#: Padding of the 1st, 2nd, 3rd... tied conv when a token has no padding mark (later ones: same).
REPORT_CONV_PADDING: tuple[str, ...] = ("same", "same", "valid")
#: What the report's marks mean by default.
DEFAULT_MARKS: dict[str, str] = {"R": "fa", "R*": "fa-updated"}

_CORE = {
    "dense": re.compile(r"^dense(\d+)$"),
    "conv": re.compile(r"^conv(\d+)\*(\d+)\*(\d+)(?:/(\d+))?$"),
    "untied": re.compile(r"^untied(\d+)\*(\d+)\*(\d+)(?:/(\d+))?$"),
    "pool": re.compile(r"^(max|avg)pool(\d+)\*(\d+)(?:/(\d+))?$"),
}
_IGNORED = {"input", "softmax", "relu"}
_PAD = re.compile(r"^(same|valid|p(\d+))$")


class Token(NamedTuple):
    kind: str          # dense | conv | untied | pool | loss
    args: tuple
    marks: tuple[str, ...]
    text: str


def _split_marks(tok: str) -> tuple[str, list[str]]:
    """``"dense10(psf(0.5))(valid)"`` -> ``("dense10", ["psf(0.5)", "valid"])``."""
    i = tok.find("(")
    core, rest, marks = (tok, "", []) if i < 0 else (tok[:i], tok[i:], [])
    depth, start = 0, None
    for j, ch in enumerate(rest):
        if ch == "(":
            if depth == 0:
                start = j + 1
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced parentheses in spec token {tok!r}")
            if depth == 0:
                marks.append(rest[start:j].strip())
        elif depth == 0 and not ch.isspace():
            raise ValueError(f"unexpected {ch!r} after the marks of spec token {tok!r}")
    if depth:
        raise ValueError(f"unbalanced parentheses in spec token {tok!r}")
    return core.strip(), marks


def parse_spec(spec: str) -> list[Token]:
    """Tokens of a spec string; raises ValueError naming the first bad token."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("spec must be a non-empty string such as 'Input - dense512 - dense10'")
    text = spec.replace("\\*", "*").strip().rstrip(".")
    text = re.sub(r"^[\w\-\*]+\s*:\s*(?=input\b)", "", text, flags=re.I)
    tokens = []
    for raw in re.split(r"\s+-\s*|\s*-\s+", text):
        if not raw:
            raise ValueError(f"empty token in spec {spec!r}")
        core, marks = _split_marks(raw)
        low = core.lower()
        if low in _IGNORED:
            if marks:
                raise ValueError(f"spec token {raw!r}: {core} takes no marks")
            continue
        if low in ("crossentropy", "hingeloss"):
            tokens.append(Token("loss", (low,), (), raw))
            continue
        for kind, rx in _CORE.items():
            m = rx.match(low)
            if m:
                break
        else:
            raise ValueError(
                f"bad spec token {raw!r}; accepted: Input, dense<N>, Conv<k>*<k>*<C>/<s>, "
                f"Untied<k>*<k>*<C>/<s>, Maxpool<k>*<k>/<s>, Avgpool<k>*<k>/<s>, softmax, "
                f"crossentropy, hingeloss, with marks like (R), (R*), (<rule>), (same), (valid)")
        g = m.groups()
        if kind == "pool":
            args = (g[0], (int(g[1]), int(g[2])), int(g[3] or g[1]))
            if marks:
                raise ValueError(f"spec token {raw!r}: pooling takes no marks")
        elif kind == "dense":
            args = (int(g[0]),)
        else:
            args = ((int(g[0]), int(g[1])), int(g[2]), int(g[3] or 1))
        if any(not 0 < a < 2**31 for a in _flat(args[1:] if kind == "pool" else args)):
            raise ValueError(f"spec token {raw!r}: sizes must be positive and below 2**31")
        tokens.append(Token(kind, args, tuple(marks), raw))
    layers = [t for t in tokens if t.kind != "loss"]
    if not any(t.kind in ("dense", "conv", "untied") for t in layers):
        raise ValueError(f"spec {spec!r} has no layer with weights")
    losses = [t for t in tokens if t.kind == "loss"]
    if len(losses) > 1 or (losses and tokens[-1].kind != "loss"):
        raise ValueError(f"spec {spec!r}: the loss must be the last token, at most one")
    return tokens


def _flat(args):
    for a in args:
        if isinstance(a, tuple):
            yield from a
        else:
            yield a


class FeedbackNet(nn.Sequential):
    """A ``nn.Sequential`` that remembers the spec it was built from."""

    def __init__(self, *modules: nn.Module, spec: str = "", loss_name: str = "crossentropy"):
        super().__init__(*modules)
        self.spec, self.loss_name = spec, loss_name

    def feedback_layers(self) -> list[tuple[str, FeedbackLayer]]:
        return list(feedback_layers(self))


class Network(NamedTuple):
    model: FeedbackNet
    loss: nn.Module


def build(spec: str, in_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, *,
          rules: Mapping[str, "str | FeedbackRule"] | None = None,
          rule: "str | FeedbackRule | None" = None,
          keep_last_bp: bool = False,
          batch_norm: bool = False, bias: bool = False, init: str = "glorot",
          conv_padding: "str | Sequence[str]" = REPORT_CONV_PADDING,
          untied_padding: str = "same") -> Network:
    """Build the network a spec describes, and its loss.

    Args:
        spec: e.g. ``"Input - dense512 - dense256(R) - dense10(R) - softmax - crossentropy"``, or
            a model of :mod:`asymlib.models` by name: ``"resnet18"``, ``"resnet20"``,
            ``"resnet18/imagenet"``, ``"alexnet@0.5"``, ``"plain6x32"`` (batch norm built in,
            cross-entropy; ``rule`` and ``keep_last_bp`` apply, marks do not).
        in_shape: ``(C, H, W)`` of an example (or ``(F,)`` for flat data).
        num_classes: the last layer must have this many units.
        rules: what each mark means, e.g. ``{"R": "fa", "R*": "kp"}`` (merged over :data:`DEFAULT_MARKS`).
        rule: the rule of every unmarked layer (default ``bp``): one rule for the whole network.
        keep_last_bp: the last layer stays ``bp`` whatever ``rule`` says (marks still win).
        batch_norm: BatchNorm (backprop) after every hidden layer, before its ReLU.
        bias, init: the report has no biases and Glorot-uniform weights.
        conv_padding: padding of tied convs without a padding mark, one string for all or one
            per conv in order (see :data:`REPORT_CONV_PADDING`).
        untied_padding: padding of untied convs without a padding mark.

    Returns:
        ``Network(model, loss)``.
    """
    factory = named_model(spec)
    if factory is not None:   # "resnet18", "alexnet", "plain6x32": asymlib.models, always with batch norm
        return Network(factory(tuple(in_shape), num_classes, rule, keep_last_bp), get_loss("crossentropy"))
    tokens = parse_spec(spec)
    unknown = [k for k in (rules or {}) if not (isinstance(k, str) and k.upper() in DEFAULT_MARKS)]
    if unknown:
        raise ValueError(f"rules: unknown mark(s) {unknown}; rules maps the spec's marks "
                         f"{', '.join(DEFAULT_MARKS)} to rule names, e.g. {{'R': 'fa'}}")
    marks_map = dict(DEFAULT_MARKS, **{k.upper(): v for k, v in (rules or {}).items()})
    if not (isinstance(num_classes, int) and num_classes > 0):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    shape = tuple(int(s) for s in in_shape)
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ValueError(f"in_shape must be (C, H, W) or (F,), got {tuple(in_shape)!r}")
    weighted = [i for i, t in enumerate(tokens) if t.kind in ("dense", "conv", "untied")]
    last = weighted[-1]
    layer_marks, paddings = {}, {}
    for i in weighted:
        tok = tokens[i]
        for mark in tok.marks:
            if mark.upper() in ("R", "R*"):
                layer_marks[str(i)] = marks_map[mark.upper()]
            elif _PAD.match(mark.lower()):
                if tok.kind == "dense":
                    raise ValueError(f"spec token {tok.text!r}: dense layers take no padding mark")
                pm = _PAD.match(mark.lower())
                paddings[i] = int(pm.group(2)) if pm.group(2) else pm.group(1)
            else:
                try:
                    is_direct(mark)
                except ValueError as err:
                    raise ValueError(f"spec token {tok.text!r}: bad mark {mark!r} ({err})") from None
                layer_marks[str(i)] = mark
    plan = resolve_rules([str(i) for i in weighted], rule, marks=layer_marks, keep_last_bp=keep_last_bp,
                         num_classes=num_classes)
    modules: list[nn.Module] = []
    n_conv = 0
    for i, tok in enumerate(tokens):
        if tok.kind == "loss":
            continue
        padding = paddings.get(i)
        kind, hidden = tok.kind, i != last
        if kind == "pool":
            if len(shape) != 3:
                raise ValueError(f"spec token {tok.text!r}: pooling needs image input, shape is {shape}")
            mode, k, s = tok.args
            pad = (k[0] // 2, k[1] // 2)
            pool = (nn.MaxPool2d(k, s, pad) if mode == "max"
                    else nn.AvgPool2d(k, s, pad, count_include_pad=True))
            if mode == "max" and modules and isinstance(modules[-1], nn.ReLU):
                # max pooling and ReLU commute (both monotone; the padding is -inf): pool first, so the
                # ReLU and its backward touch a quarter of the values. The same numbers, gradients
                # included (the pool's argmax is unchanged wherever the ReLU passes a gradient)
                modules.insert(len(modules) - 1, pool)
            else:
                modules.append(pool)
            shape = (shape[0], *((shape[j + 1] + 2 * pad[j] - k[j]) // s + 1 for j in range(2)))
            continue
        if kind == "dense":
            if len(shape) == 3:
                modules.append(nn.Flatten())
                shape = (shape[0] * shape[1] * shape[2],)
            (width,) = tok.args
            layer = Linear(shape[0], width, bias=bias, rule=plan.rules[str(i)], init=init)
            shape = (width,)
            norm = nn.BatchNorm1d(width)
        else:
            if len(shape) != 3:
                raise ValueError(f"spec token {tok.text!r}: convolution needs (C, H, W) input, shape is {shape}")
            k, C, s = tok.args
            if kind == "conv":
                if padding is None:
                    seq = [conv_padding] if isinstance(conv_padding, str) else list(conv_padding)
                    padding = seq[n_conv] if n_conv < len(seq) else "same"
                n_conv += 1
                layer = Conv2d(shape[0], C, k, s, padding, bias=bias, rule=plan.rules[str(i)],
                               init=init, input_size=shape[1:])
            else:
                layer = LocallyConnected2d(shape[0], C, k, shape[1:], s,
                                           untied_padding if padding is None else padding,
                                           bias=bias, rule=plan.rules[str(i)], init=init)
            H, W = ((shape[j + 1] + 2 * layer.padding[j] - k[j]) // s + 1 for j in range(2))
            if H < 1 or W < 1:
                raise ValueError(f"spec token {tok.text!r}: kernel {k} does not fit input {shape}")
            shape = (C, H, W)
            norm = nn.BatchNorm2d(C)
        modules.append(layer)
        if hidden:
            if batch_norm:
                modules.append(norm)
            modules.append(nn.ReLU())
    if shape != (num_classes,):
        raise ValueError(f"spec {spec!r} ends with output shape {shape}, expected ({num_classes},) "
                         f"for num_classes={num_classes}")
    if plan.dfa is not None:
        modules.append(plan.dfa.tap())
    loss_tok = [t for t in tokens if t.kind == "loss"]
    loss_name = loss_tok[0].args[0] if loss_tok else "crossentropy"
    model = FeedbackNet(*modules, spec=spec, loss_name=loss_name)
    return Network(model, get_loss(loss_name))
