r"""Feedback rules: what replaces W in the backward pass.

A layer computes :math:`a = h W^\top` (torch's convention, ``W`` is ``out x in``). Backprop sends
:math:`\partial L/\partial h = G\,W` back, with :math:`G = \partial L/\partial a`, and updates
:math:`W` with :math:`\partial L/\partial W = G^\top h`. An asymmetric rule keeps the weight
gradient and swaps the matrix of the input gradient:

.. math::  \delta h = G\,B, \qquad \nabla_W = G^\top h .

A rule is a small object that holds only hyper-parameters. ``rule.bind(layer)`` registers the
rule's state (buffers for fixed matrices, parameters for learned ones) on the layer, so one rule
object may serve many layers. The layer asks the rule, during backward, for

* ``input_grad(layer, G, x)``  -- :math:`\delta h` (default: ``layer.grad_input(G, B)``),
* ``weight_grad(layer, gW)``   -- the gradient the optimizer sees for W (default: ``gW``),
* ``feedback_grads(layer, gW)``-- gradients for the rule's learned parameters (default: none), from gW in
  the compute dtype (the layer casts them to the parameters' dtype).

``layer.B`` reads the feedback matrix in force, whatever the rule (see :func:`feedback_matrix`).

Rules (names accepted by :func:`get_rule`; parameters in parentheses, e.g. ``"psf(0.75)"``):

=============  ====================================================================================
``bp``         :math:`B = W` (exact backprop).
``fa``         fixed random :math:`B_0`, drawn like W (Glorot uniform); Lillicrap et al. 2016, the
               report's "R".
``fa-updated`` the report's "R*": :math:`B` is a parameter that receives W's gradient
               :math:`G^\top h` and its own optimizer state (the report's code did the same).
``kp(λ)``      Kolen--Pollack (Akrout et al. 2019): like ``fa-updated`` plus weight decay λ on both.
``usf``        :math:`B = \sigma\,\mathrm{sign}(W)` (Liao et al. 2016), σ the Glorot std.
``brsf``       :math:`B = |M|\circ\mathrm{sign}(W)`, M redrawn every training batch.
``frsf``       :math:`B = |M|\circ\mathrm{sign}(W)`, M fixed.
``psf(p)``     :math:`B = D\circ|M|\circ\mathrm{sign}(W)`, D a fixed ±1 mask with a fraction p of +1.
``dfa``        direct feedback alignment (Nøkland 2016): :math:`\delta h_l = e\,B_l`, e the output error.
``pfa(k)``     Product Feedback Alignment (Li & Benna 2024): :math:`B = P R`, P fixed, R learned.
=============  ====================================================================================
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import TYPE_CHECKING, Callable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from .layers import FeedbackLayer

__all__ = [
    "FeedbackRule", "Backprop", "FeedbackAlignment", "UpdatedFeedback", "KolenPollack",
    "UniformSignFeedback", "BatchRandomSignFeedback", "FixedRandomSignFeedback",
    "PartialSignFeedback", "DirectFeedback", "ProductFeedback", "get_rule", "parse_rule", "canonical_rule", "resolve_rules", "RulePlan", "is_direct", "RULES",
    "glorot_uniform_", "glorot_std", "glorot_bound", "gradient_scale",
]


_GRADIENT_SCALE = [1.0]    # set by gradient_scale() while a scaled loss is differentiated


@contextlib.contextmanager
def gradient_scale(scale: float):
    """Within the block, the loss being differentiated was multiplied by ``scale`` (a grad scaler's
    factor, fp16): the terms a rule adds to gradients itself (the decay of ``kp`` and ``pfa``) are
    multiplied by it too, so that they come out right when the scaler divides the gradients back.
    Without it, a scale of 65536 would shrink the decay 65536-fold. :func:`asymlib.training.scaled_backward`
    does this for you::

        with asymlib.rules.gradient_scale(scaler.get_scale()):
            scaler.scale(loss).backward()
    """
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"gradient_scale: scale must be a finite number > 0, got {scale!r}")
    previous, _GRADIENT_SCALE[0] = _GRADIENT_SCALE[0], float(scale)
    try:
        yield
    finally:
        _GRADIENT_SCALE[0] = previous


def _decay(weight_decay: float) -> float:
    """A rule's own decay λ as the loss is scaled now (:func:`gradient_scale`; 1 outside it)."""
    return weight_decay * _GRADIENT_SCALE[0]


def _fans(shape: torch.Size) -> tuple[int, int]:
    """Glorot's fans for a weight of shape ``(out, in, *kernel)`` (or ``(out, positions, in*k*k)``
    for a locally connected layer, see :class:`asymlib.LocallyConnected2d`)."""
    return nn.init._calculate_fan_in_and_fan_out(torch.empty(shape, device="meta"))


def glorot_std(shape: torch.Size, fans: tuple[int, int] | None = None) -> float:
    r"""Standard deviation of Glorot's init: :math:`\sqrt{2/(n_{in}+n_{out})}`."""
    fan_in, fan_out = fans or _fans(shape)
    return math.sqrt(2.0 / (fan_in + fan_out))


def glorot_bound(shape: torch.Size, fans: tuple[int, int] | None = None) -> float:
    r"""Half-width of Glorot's uniform init, :math:`a = \sqrt{3}\,\sigma = \sqrt{6/(n_{in}+n_{out})}`."""
    return math.sqrt(3.0) * glorot_std(shape, fans)


def glorot_uniform_(t: Tensor, fans: tuple[int, int] | None = None) -> Tensor:
    r"""Fill ``t`` from :math:`U(-a, a)`, :math:`a = \sqrt{6/(n_{in}+n_{out})}` (Lasagne's GlorotUniform)."""
    a = glorot_bound(t.shape, fans)
    with torch.no_grad():
        return t.uniform_(-a, a)


def _uniform16_(t: Tensor, a: float) -> Tensor:
    r"""Fill ``t`` from :math:`U(-a, a)` on a grid of :math:`2^{16}` values (the midpoints
    :math:`(k + \tfrac12)\,a/2^{15}`, k = -2^15 ... 2^15 - 1), four values per 64-bit draw of the generator.

    For feedback that a 16-bit backward rounds to 8 or 11 significant bits anyway: a quarter of
    :meth:`torch.Tensor.uniform_`'s draws (measured on the CPU: ~0.3 vs ~1 ms for 134k values).
    """
    words = torch.empty((t.numel() + 3) // 4, dtype=torch.int64, device=t.device).random_(-2**63, None)
    k = words.view(torch.int16)[:t.numel()].view(t.shape)          # 4 uniform 16-bit integers per draw
    with torch.no_grad():
        return torch.add(k, 0.5, out=t).mul_(a / 2**15)


class FeedbackRule:
    """Base class: the interface every rule implements. Subclasses override what differs."""

    name: str = "?"
    #: True when the rule changes the input gradient (everything but ``bp``).
    asymmetric: bool = True
    #: True when the rule computes the input gradient itself (:meth:`input_grad`, as DFA does) rather
    #: than through the layer's own transposed map with B (which layers may fuse with ∇W).
    direct: bool = False

    def bind(self, layer: "FeedbackLayer") -> None:
        """Register the rule's state on ``layer`` (called once, from the layer's constructor)."""

    def on_forward(self, layer: "FeedbackLayer") -> None:
        """Called at every training-mode forward pass (brSF redraws M here)."""

    def feedback(self, layer: "FeedbackLayer") -> Tensor:
        """The matrix B of the input gradient, with W's shape."""
        raise NotImplementedError

    def feedback_as(self, layer: "FeedbackLayer", dtype: torch.dtype) -> Tensor:
        """B in the backward's compute dtype (the autocast dtype, else W's): :meth:`feedback`, cast. A
        rule whose B is itself a product (pfa) computes that product in ``dtype``."""
        return self.feedback(layer).to(dtype)

    def feedback_params(self, layer: "FeedbackLayer") -> tuple[Tensor, ...]:
        """Learned tensors of the rule, handed to the autograd function so they get gradients."""
        return ()

    def input_grad(self, layer: "FeedbackLayer", G: Tensor, x: Tensor) -> Tensor:
        r""":math:`\delta h = G B` (as a (transposed) convolution for conv layers)."""
        return layer.grad_input(G, self.feedback(layer), x.shape)

    def weight_grad(self, layer: "FeedbackLayer", gW: Tensor) -> Tensor:
        r"""The gradient handed to W's optimizer; :math:`G^\top h` unless the rule adds a term.

        Called after :meth:`feedback_grads`, with ``gW`` freshly computed: it may add to it in place."""
        return gW

    def feedback_grads(self, layer: "FeedbackLayer", gW: Tensor) -> tuple[Tensor, ...]:
        """Gradients of :meth:`feedback_params`, in the same order. ``gW`` is in the compute dtype (bf16
        or fp16 under autocast); the layer casts what this returns to the parameters' dtype."""
        return ()

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = self.extra_repr()
        return f"{self.name}({extra})" if extra else self.name


class Backprop(FeedbackRule):
    r""":math:`B = W`: exact backpropagation."""

    name = "bp"
    asymmetric = False

    def feedback(self, layer):
        return layer.weight.detach()


class FeedbackAlignment(FeedbackRule):
    r"""Fixed random feedback :math:`B = B_0`, :math:`B_0` Glorot-uniform like W (the report's R)."""

    name = "fa"

    def bind(self, layer):
        layer.register_buffer("feedback_weight", glorot_uniform_(torch.empty_like(layer.weight),
                                                                 layer.fans()))

    def feedback(self, layer):
        return layer.feedback_weight


class UpdatedFeedback(FeedbackRule):
    r"""The report's R*: B starts random and gets the *same gradient* as W.

    "Same update" here means: B is an ``nn.Parameter`` whose gradient is set to W's,
    :math:`\nabla_B = \nabla_W = G^\top h`, and the optimizer treats it as any parameter, with its
    own state. This is what the report's code did (B's gradient set to :math:`h^\top G`, B trainable).
    For Adam, SGD, Nesterov and Batch Manhattan without weight decay, the update is a function of the
    gradient history alone, so B and W take identical steps and :math:`B_t - W_t = B_0 - W_0` exactly
    (tested). It also keeps the rule local to the optimizer: no second code path copies deltas.
    """

    name = "fa-updated"

    def bind(self, layer):
        layer.feedback_weight = nn.Parameter(
            glorot_uniform_(torch.empty_like(layer.weight), layer.fans()))

    def feedback(self, layer):
        return layer.feedback_weight.detach()

    def feedback_params(self, layer):
        return (layer.feedback_weight,)

    def feedback_grads(self, layer, gW):
        return (gW,)


class KolenPollack(UpdatedFeedback):
    r"""Kolen--Pollack (Akrout et al. 2019): B and W get the same gradient plus their own decay,

    .. math:: \nabla_W = G^\top h + \lambda W, \qquad \nabla_B = G^\top h + \lambda B .

    With SGD at learning rate η, :math:`B_{t+1} - W_{t+1} = (1-\eta\lambda)(B_t - W_t)`, so
    :math:`B \to W`. The decay is part of the rule (not the optimizer's ``weight_decay``), so it
    acts on B and W alike whatever optimizer is used; the exact contraction holds for SGD.
    """

    name = "kp"

    def __init__(self, weight_decay: float = 1e-3):
        if not weight_decay >= 0:
            raise ValueError(f"kp: weight_decay must be >= 0, got {weight_decay!r}")
        self.weight_decay = float(weight_decay)

    def weight_grad(self, layer, gW):   # one pass, in place
        return gW.add_(layer.weight.detach(), alpha=_decay(self.weight_decay))

    def feedback_grads(self, layer, gW):
        B = layer.feedback_weight.detach()
        if gW.dtype == B.dtype:
            return (torch.add(gW, B, alpha=_decay(self.weight_decay)),)
        # under autocast (a 16-bit gW, an fp32 B): one cast, then an fp32 add in place; torch's
        # mixed-dtype add is the slower path (measured: DS0's first layer, 1 thread, 3.4 -> 2.1 ms)
        return (gW.to(B.dtype).add_(B, alpha=_decay(self.weight_decay)),)

    def extra_repr(self):
        return f"{self.weight_decay:g}"


class UniformSignFeedback(FeedbackRule):
    r"""uSF (Liao et al. 2016): :math:`B = \sigma\,\mathrm{sign}(W)`.

    σ is the std of W's Glorot init, so that :math:`\|B\| \approx \|W_0\|`; the paper uses unit
    magnitudes, and only the sign matters to the direction of :math:`\delta h`.
    """

    name = "usf"

    def feedback(self, layer):
        # copysign: sigma with W's sign in one pass (equal to sigma * sign(W) wherever W != 0)
        W = layer.weight.detach()
        return torch.copysign(W.new_tensor(glorot_std(W.shape, layer.fans())), W)


class FixedRandomSignFeedback(FeedbackRule):
    r"""frSF: :math:`B = |M| \circ \mathrm{sign}(W)`, M fixed (Glorot uniform)."""

    name = "frsf"

    def bind(self, layer):
        layer.register_buffer("feedback_magnitude",
                              glorot_uniform_(torch.empty_like(layer.weight), layer.fans()).abs_())

    def feedback(self, layer):
        # |M| with W's sign in one pass (equal to |M| * sign(W) wherever W != 0)
        return torch.copysign(layer.feedback_magnitude, layer.weight.detach())


class BatchRandomSignFeedback(FixedRandomSignFeedback):
    r"""brSF: :math:`B = |M| \circ \mathrm{sign}(W)`, M redrawn at every training batch.

    The draw happens when B is first used after a training forward (so a first layer, whose B the
    backward never needs, draws nothing: in DS0 that is 92% of the draws). Under a 16-bit autocast,
    M is drawn on a :math:`2^{16}`-value grid (:func:`_uniform16_`, a quarter of the draws; B is rounded
    to 8 or 11 significant bits for the backward anyway), so a bf16 run draws another stream than an
    fp32 run of the same seed; fp32 draws are Glorot-uniform as ever.
    """

    name = "brsf"

    def bind(self, layer):
        super().bind(layer)
        layer._magnitude_stale = False

    def on_forward(self, layer):
        layer._magnitude_stale = True     # a new batch: M is redrawn when B is next used

    def _redraw_if_stale(self, layer, bits: int = 32) -> None:
        # no abs_: copysign in feedback keeps |M| with W's sign. A 16-bit backward rounds B to 8 (bf16) or
        # 11 (fp16) significant bits: M drawn on a 2^16 grid loses nothing there, for a quarter of the draws
        if layer._magnitude_stale:
            if bits < 32:
                _uniform16_(layer.feedback_magnitude, glorot_bound(layer.weight.shape, layer.fans()))
            else:
                glorot_uniform_(layer.feedback_magnitude, layer.fans())
            layer._magnitude_stale = False

    def feedback(self, layer):
        self._redraw_if_stale(layer)
        return super().feedback(layer)

    def feedback_as(self, layer, dtype):
        self._redraw_if_stale(layer, torch.finfo(dtype).bits)
        return self.feedback(layer).to(dtype)


class PartialSignFeedback(FixedRandomSignFeedback):
    r"""psf(p): :math:`B = D \circ |M| \circ \mathrm{sign}(W)`, D a fixed ±1 mask, exactly
    :math:`\mathrm{round}(p\,n)` of its n entries +1 (sign-concordant with W), the rest -1.

    p = 1 is frSF, p = 0.5 gives B a random sign per entry, p = 0 is anti-concordant.
    """

    name = "psf"

    def __init__(self, p: float = 0.5):
        if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
            raise ValueError(f"psf: p must be a number in [0, 1] (fraction of concordant signs), got {p!r}")
        self.p = float(p)

    def bind(self, layer):
        super().bind(layer)
        n = layer.weight.numel()
        mask = -torch.ones(n)
        mask[torch.randperm(n)[: round(self.p * n)]] = 1.0
        layer.register_buffer("feedback_concordance", mask.view_as(layer.weight).to(layer.weight))

    def feedback(self, layer):
        return super().feedback(layer).mul_(layer.feedback_concordance)   # copysign's fresh tensor, in place

    def extra_repr(self):
        return f"{self.p:g}"


class _ErrorTap(torch.autograd.Function):
    """Identity forward; backward records the output error e = dL/d(output) for DFA."""

    @staticmethod
    def forward(ctx, rule, y):
        ctx.rule = rule
        return y.view_as(y)

    @staticmethod
    def backward(ctx, e):
        ctx.rule.error = e.detach().flatten(1)
        return None, e


class ErrorTap(nn.Module):
    """Put at a network's output: records the error that :class:`DirectFeedback` layers receive."""

    def __init__(self, rule: "DirectFeedback"):
        super().__init__()
        self.rule = rule

    def forward(self, y: Tensor) -> Tensor:
        return _ErrorTap.apply(self.rule, y)

    def extra_repr(self) -> str:
        return f"records e for {self.rule!r}"


class DirectFeedback(FeedbackRule):
    r"""Direct feedback alignment (Nøkland 2016).

    The output error :math:`e = \partial L / \partial y` (``N x num_classes``) reaches the input of
    every DFA layer through that layer's own fixed random matrix :math:`B_l`
    (``num_classes x in_features``): :math:`\delta h_{l} = e B_l`. The layer below multiplies by
    its activation's derivative in autograd, so its delta is :math:`(e B_l) \odot f'(a_{l-1})`.
    Its own weight gradient stays :math:`G^\top h`.

    One ``DirectFeedback`` object serves a whole network: put ``rule.tap()`` at the output
    (:func:`asymlib.build` does) so that backward records e before the hidden layers need it.
    Conv and locally connected layers need ``input_size`` to size :math:`B_l`.
    """

    name = "dfa"
    direct = True

    def __init__(self, num_classes: int = 10):
        if not (isinstance(num_classes, int) and num_classes > 0):
            raise ValueError(f"dfa: num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.error: Tensor | None = None

    def tap(self) -> ErrorTap:
        return ErrorTap(self)

    def bind(self, layer):
        in_features = layer.in_features_total()
        fans = (num := self.num_classes, in_features)
        B = torch.empty(num, in_features, device=layer.weight.device, dtype=layer.weight.dtype)
        layer.register_buffer("feedback_weight", glorot_uniform_(B, fans))

    def feedback(self, layer):
        return layer.feedback_weight

    def input_grad(self, layer, G, x):
        if self.error is None or self.error.shape[0] != x.shape[0]:
            raise RuntimeError(
                "dfa: no output error recorded for this batch; put rule.tap() at the network's "
                "output (asymlib.build does this) so the error reaches the DFA layers")
        return (self.error.to(x.dtype) @ layer.feedback_weight.to(x.dtype)).view(x.shape)

    def extra_repr(self):
        return f"num_classes={self.num_classes}"


class ProductFeedback(FeedbackRule):
    r"""Product Feedback Alignment (Li & Benna 2024), as implemented in this book.

    The error goes back through a fixed random :math:`P` (``out x n_mid``,
    :math:`n_{mid} = k \cdot out`, entries :math:`\mathcal N(0, 1/n_{mid})` so that
    :math:`P P^\top \approx I`) and a learned :math:`R` (``n_mid x in``):
    :math:`\delta h = G P R`, i.e. :math:`B = P R`.

    R's local rule: the n_mid intermediate neurons receive the error through P, :math:`P^\top G^\top`,
    and see the layer's input h, so R takes the Hebbian product, plus decay λ as in KP:

    .. math:: \nabla_R = P^\top (G^\top h) + \lambda R = P^\top \nabla_W + \lambda R,
              \qquad \nabla_W = G^\top h + \lambda W .

    With SGD, :math:`\Delta(PR) = PP^\top \Delta W`; the larger k, the closer :math:`PP^\top` is to
    I and the closer B tracks W, while the decay removes the random initial part of B - W.
    """

    name = "pfa"

    def __init__(self, expansion: float = 1.0, weight_decay: float = 1e-3):
        if not (isinstance(expansion, (int, float)) and 0 < expansion < 1e6):
            raise ValueError(f"pfa: expansion ratio must be a number in (0, 1e6), got {expansion!r}")
        if not weight_decay >= 0:
            raise ValueError(f"pfa: weight_decay must be >= 0, got {weight_decay!r}")
        self.expansion, self.weight_decay = float(expansion), float(weight_decay)

    def bind(self, layer):
        W = layer.weight
        out, rest = W.shape[0], W[0].numel()
        n_mid = max(1, round(self.expansion * out))
        P = torch.randn(out, n_mid, dtype=W.dtype, device=W.device) / math.sqrt(n_mid)
        layer.register_buffer("feedback_fixed", P)
        layer.feedback_learned = nn.Parameter(
            glorot_uniform_(torch.empty(n_mid, rest, dtype=W.dtype, device=W.device), layer.fans()))

    def feedback(self, layer):
        return self.feedback_as(layer, layer.weight.dtype)

    def feedback_as(self, layer, dtype):
        # under autocast the product runs in the compute dtype, as the layer's own products do (in fp32
        # on this CPU it cost pfa(2) on DD 4.4x bp's bf16 step against its multiply-add ratio of 2)
        P, R = layer.feedback_fixed, layer.feedback_learned.detach()
        return (P.to(dtype) @ R.to(dtype)).view_as(layer.weight)

    def feedback_params(self, layer):
        return (layer.feedback_learned,)

    def weight_grad(self, layer, gW):
        return gW + _decay(self.weight_decay) * layer.weight.detach()

    def feedback_grads(self, layer, gW):
        R = layer.feedback_learned.detach()
        return (layer.feedback_fixed.T.to(gW.dtype) @ gW.reshape(gW.shape[0], -1)
                + _decay(self.weight_decay) * R,)

    def extra_repr(self):
        return f"{self.expansion:g}"


#: Rule constructors by name.
RULES: dict[str, Callable[..., FeedbackRule]] = {
    "bp": Backprop, "fa": FeedbackAlignment, "fa-updated": UpdatedFeedback, "kp": KolenPollack,
    "usf": UniformSignFeedback, "brsf": BatchRandomSignFeedback, "frsf": FixedRandomSignFeedback,
    "psf": PartialSignFeedback, "dfa": DirectFeedback, "pfa": ProductFeedback,
}

_RULE_RE = re.compile(r"^\s*([a-z][a-z\-]*)\s*(?:\(\s*([^()]*?)\s*\))?\s*$")


#: the constructor argument a rule's parenthesised parameter sets
RULE_PARAMETER = {"psf": "p", "kp": "weight_decay", "pfa": "expansion", "dfa": "num_classes"}


def parse_rule(rule: str) -> tuple[str, float | int | None]:
    """``"PSF(0.50)"`` -> ``("psf", 0.5)``: the one parser of rule names (case and spaces do not
    matter); raises ValueError naming the bad part and what is accepted."""
    if not isinstance(rule, str):
        raise ValueError(f"rule must be a name or a FeedbackRule, got {type(rule).__name__}")
    m = _RULE_RE.match(rule.lower())
    if not m or m.group(1) not in RULES:
        raise ValueError(f"unknown feedback rule {rule!r}; accepted: {', '.join(RULES)} "
                         "(parameters in parentheses: psf(p), kp(weight_decay), pfa(expansion), dfa(classes))")
    name, arg = m.groups()
    if not arg:
        return name, None
    if name not in RULE_PARAMETER:
        raise ValueError(f"rule {name!r} takes no parameter, got {rule!r}")
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(f"rule {rule!r}: parameter {arg!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"rule {rule!r}: parameter must be a finite number, got {arg!r}")
    if name == "dfa":
        if not value.is_integer() or value < 1:
            raise ValueError(f"rule {rule!r}: dfa's parameter is the number of classes, a positive integer")
        return name, int(value)
    return name, value


def canonical_rule(rule: str | None) -> str | None:
    """The one spelling of a rule name under which runs are stored: ``"PSF(0.50)"`` -> ``"psf(0.5)"``."""
    if rule is None:
        return None
    name, value = parse_rule(rule)
    return name if value is None else f"{name}({value:g})"


def get_rule(rule: "str | FeedbackRule | None", **kwargs) -> FeedbackRule:
    """A rule from its name, e.g. ``"fa"``, ``"psf(0.75)"``, ``"pfa(5)"``; a rule object passes through.

    ``kwargs`` go to the rule's constructor (``num_classes`` for dfa, ``p`` for psf, ...).
    """
    if rule is None:
        return Backprop()
    if isinstance(rule, FeedbackRule):
        return rule
    name, value = parse_rule(rule)
    if value is not None:
        kwargs[RULE_PARAMETER[name]] = value
    if name != "dfa":
        kwargs.pop("num_classes", None)
    return RULES[name](**kwargs)


class RulePlan(NamedTuple):
    """What :func:`resolve_rules` returns: each layer's rule object, and the network's one DFA object
    (or None), whose ``tap()`` goes at the network's output."""

    rules: dict
    dfa: "DirectFeedback | None"


def is_direct(choice: "str | FeedbackRule | None") -> bool:
    """Does this choice name DFA (which needs the network's output count and an output tap)?"""
    if isinstance(choice, FeedbackRule):
        return getattr(choice, "direct", False)
    return choice is not None and parse_rule(choice)[0] == "dfa"


def resolve_rules(layers: Sequence[str], rule: "str | FeedbackRule | None | Callable[[str], object]" = None, *,
                  marks: "Mapping[str, str | FeedbackRule] | None" = None, keep_last_bp: bool = False,
                  num_classes: int | None = None) -> RulePlan:
    """The one door for a network's rule choices, used by :func:`asymlib.build`, :func:`asymlib.convert`
    and the named models alike.

    Args:
        layers: the feedback layers' names, in forward order (the last one is the output layer).
        rule: the rule of every layer without a mark: a name, a rule object, None (``bp``), or a
            function ``name -> rule`` choosing per layer.
        marks: rules for particular layers (the spec's ``(R)``, ``(R*)``, ``(usf)``...); they win
            over ``rule`` and ``keep_last_bp``.
        keep_last_bp: the last layer stays ``bp`` unless marked.
        num_classes: the network's outputs; needed (and checked) when a layer uses ``dfa``.

    Returns:
        :class:`RulePlan`: one rule object per layer, each name parsed once here; every DFA layer
        shares one :class:`DirectFeedback` (it carries the output error to all of them).
    """
    marks = dict(marks or {})
    unknown = [m for m in marks if m not in layers]
    if unknown:
        raise ValueError(f"marks name layers that do not exist: {unknown}; layers: {list(layers)}")
    chosen = {}
    for i, name in enumerate(layers):
        if name in marks:
            chosen[name] = marks[name]
        elif keep_last_bp and i == len(layers) - 1:
            chosen[name] = None
        else:
            chosen[name] = rule(name) if callable(rule) and not isinstance(rule, FeedbackRule) else rule
    dfa, out = None, {}
    for name, choice in chosen.items():
        if is_direct(choice):
            if num_classes is None:
                raise ValueError(f"layer {name!r}: dfa needs the network's number of outputs (num_classes)")
            obj = get_rule(choice, num_classes=num_classes)
            if obj.num_classes != num_classes:
                raise ValueError(f"rule {choice!r}: DFA's matrices map the output error, and this network has "
                                 f"{num_classes} outputs; write 'dfa' (or 'dfa({num_classes})')")
            dfa = dfa or obj
            out[name] = dfa
        else:
            out[name] = get_rule(choice)
    return RulePlan(out, dfa)
