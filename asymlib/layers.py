r"""Layers whose backward pass follows a feedback rule.

Every layer here is one linear map :math:`a = \mathcal{W}(h)` (dense, convolution, or untied
convolution) and one autograd function, :class:`_FeedbackFunction`, whose explicit backward computes

.. math:: \delta h = \mathcal{B}^\top(G) \quad\text{(the rule's matrix, never W's)},\qquad
          \nabla_W = \text{the usual weight gradient of } \mathcal{W} \text{ at } (h, G),

so the backprop input gradient is never computed and thrown away. A layer implements three maps:
``forward_op(x, W, b)``, ``grad_input(G, B, x_shape)`` and ``grad_weight(x, G)``; the rule decides
which B ``grad_input`` gets.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .rules import FeedbackRule, get_rule, glorot_uniform_

__all__ = ["FeedbackLayer", "Linear", "Conv2d", "LocallyConnected2d", "exact_backprop",
           "feedback_layers"]


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast computes in on x's device, or None when autocast is off there."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


class _FeedbackFunction(torch.autograd.Function):
    """The one explicit backward of every feedback layer. Under ``torch.autocast`` the forward and the
    backward both run in the autocast dtype (bf16, fp16): x, W and B are cast down for the products,
    while the gradients handed to W, b and a learned B come back in their own dtype (fp32 master
    weights, fp32 optimizer state). Without autocast nothing is cast: the fp32 numbers are unchanged."""

    @staticmethod
    def forward(ctx, layer: "FeedbackLayer", x: Tensor, weight: Tensor, bias: Tensor | None,
                *feedback_params: Tensor) -> Tensor:
        ctx.layer = layer
        ctx.has_bias = bias is not None
        ctx.dtype = dtype = _autocast_dtype(x)
        if dtype is None:
            ctx.save_for_backward(x, weight)
            return layer.forward_op(x, weight, bias)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        ctx.save_for_backward(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            return layer.forward_op(x, weight, bias)

    @staticmethod
    def backward(ctx, G: Tensor):
        layer: FeedbackLayer = ctx.layer
        x, W = ctx.saved_tensors          # in the compute dtype
        with torch.autocast(x.device.type, enabled=False) if ctx.dtype is not None else contextlib.nullcontext():
            return _FeedbackFunction._grads(ctx, layer, x, W, layer.grad_output_layout(G.to(x.dtype), x))

    @staticmethod
    def _grads(ctx, layer: "FeedbackLayer", x: Tensor, W: Tensor, G: Tensor):
        rule = layer.rule
        need_x = ctx.needs_input_grad[1]
        if layer.exact or not rule.direct:
            # delta = G B with a matrix B (W itself for exact backprop, used by the metrics). B is built
            # only when delta is needed (not for a first layer): the layers read just its shape otherwise
            B = W if layer.exact or not rule.asymmetric or not need_x else rule.feedback_as(layer, x.dtype)
            gx, gW = layer.grads(x, G, B, need_x)
        else:  # a rule with its own delta (DFA)
            gx = rule.input_grad(layer, G, x) if need_x else None
            gW = layer.grad_weight(x, G)
        # a learned B's gradients from gW in the compute dtype (pfa's product runs in it), then every
        # gradient in its parameter's dtype (fp32 master weights); first: weight_grad may add to gW in place
        gB = [g.to(p.dtype) for g, p in zip(rule.feedback_grads(layer, gW), rule.feedback_params(layer))]
        gW = gW.to(layer.weight.dtype)
        gb = layer.grad_bias(G).to(layer.bias.dtype) if ctx.has_bias else None
        return (None, gx, rule.weight_grad(layer, gW), gb, *gB)


class FeedbackLayer(nn.Module):
    """Base of :class:`Linear`, :class:`Conv2d` and :class:`LocallyConnected2d`.

    ``weight`` (and ``bias``) are parameters; the rule's state lives on the layer as buffers
    (fixed matrices) or parameters (learned feedback), all named ``feedback_*``.
    ``layer.B`` is the feedback matrix in force, for every rule.
    """

    weight: Tensor
    bias: Tensor | None

    def _finish_init(self, rule, bias_shape: tuple[int, ...] | None, init: str, **rule_kwargs) -> None:
        if init not in ("glorot", "torch"):
            raise ValueError(f"init must be 'glorot' (the report's) or 'torch' (torch's default), got {init!r}")
        if init == "glorot":
            glorot_uniform_(self.weight, self.fans())
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.bias = nn.Parameter(torch.zeros(bias_shape)) if bias_shape is not None else None
        if self.bias is not None and init == "torch":
            bound = 1 / math.sqrt(self.fans()[0])
            nn.init.uniform_(self.bias, -bound, bound)
        self.rule: FeedbackRule = get_rule(rule, **rule_kwargs)
        #: when True, backward uses B = W whatever the rule (see :func:`exact_backprop`)
        self.exact = False
        self.rule.bind(self)

    # -- what each layer type defines ---------------------------------------------------------
    def fans(self) -> tuple[int, int]:
        """(fan_in, fan_out) for Glorot's init of W and of the rule's random matrices."""
        return nn.init._calculate_fan_in_and_fan_out(self.weight)

    def forward_op(self, x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
        raise NotImplementedError

    def grad_input(self, G: Tensor, B: Tensor, x_shape: torch.Size) -> Tensor:
        raise NotImplementedError

    def grad_weight(self, x: Tensor, G: Tensor) -> Tensor:
        raise NotImplementedError

    def grad_bias(self, G: Tensor) -> Tensor:
        return G.sum(dim=[d for d in range(G.dim()) if d != 1])

    def grad_output_layout(self, G: Tensor, x: Tensor) -> Tensor:
        """G in the memory layout the backward's products want: the input's (channels-last stays
        channels-last through the fused backward)."""
        fmt = (torch.channels_last if x.dim() == 4 and not x.is_contiguous()
               and x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
        return G.contiguous(memory_format=fmt)

    def grads(self, x: Tensor, G: Tensor, B: Tensor, need_input: bool) -> tuple[Tensor | None, Tensor]:
        """(input gradient through B or None, weight gradient); layers may fuse the two."""
        return (self.grad_input(G, B, x.shape) if need_input else None), self.grad_weight(x, G)

    def in_features_total(self) -> int:
        """Number of input units per example (sizes DFA's matrices)."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    @property
    def B(self) -> Tensor:
        """The matrix the input gradient goes through (W itself for ``bp``; ``num_classes x in``
        for ``dfa``), detached."""
        return self.rule.feedback(self).detach()

    def forward(self, x: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            self.rule.on_forward(self)
        return _FeedbackFunction.apply(self, x, self.weight, self.bias,
                                       *self.rule.feedback_params(self))

    def _rule_repr(self) -> str:
        return f", bias={self.bias is not None}, rule={self.rule!r}"


class Linear(FeedbackLayer):
    r"""Dense layer :math:`a = h W^\top + b` whose backward sends the error through the rule's B.

    .. math:: \delta h = G\,B, \qquad \nabla_W = G^\top h, \qquad \nabla_b = \textstyle\sum_n G_n,

    with :math:`G = \partial L / \partial a`; ``rule="bp"`` makes :math:`B = W` (``torch.nn.Linear``'s
    backward, tested equal to it).

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: add a learnable bias (the report's nets have none: ``bias=False``). Default: True.
        rule: the feedback rule: a name (``"bp"``, ``"fa"``, ``"fa-updated"``, ``"kp(λ)"``, ``"usf"``,
            ``"brsf"``, ``"frsf"``, ``"psf(p)"``, ``"dfa"``, ``"pfa(k)"``; see :mod:`asymlib.rules`) or a
            rule object. Default: ``"bp"``.
        init: ``"glorot"`` (Glorot-uniform W, the report's) or ``"torch"`` (``nn.Linear``'s).
        **rule_kwargs: passed to the rule's constructor (e.g. ``p=0.25`` for ``psf``).

    Shape:
        - Input: :math:`(*, H_{in})` with :math:`H_{in}` = ``in_features``.
        - Output: :math:`(*, H_{out})` with :math:`H_{out}` = ``out_features``.

    Attributes:
        weight: the learnable W, ``(out_features, in_features)``.
        bias: the learnable b, ``(out_features,)``, or None.
        rule: the :class:`~asymlib.rules.FeedbackRule` in force; its state lives on the layer as
            ``feedback_*`` buffers (fixed B) or parameters (learned B: R*, KP, PFA).
        B: the feedback matrix in force, detached, W's shape (``num_classes x in_features`` for DFA).

    Example::

        >>> layer = asymlib.Linear(784, 256, rule="fa")
        >>> h = torch.randn(32, 784, requires_grad=True)
        >>> layer(h).sum().backward()          # h.grad = G @ layer.B, not G @ layer.weight
        >>> layer.weight.grad.shape
        torch.Size([256, 784])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 rule: "str | FeedbackRule | None" = "bp", init: str = "glorot", **rule_kwargs):
        super().__init__()
        _positive("Linear", in_features=in_features, out_features=out_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self._finish_init(rule, (out_features,) if bias else None, init, **rule_kwargs)

    def forward_op(self, x, W, b):
        return F.linear(x, W, b)

    def grad_input(self, G, B, x_shape):
        return (G @ B).view(x_shape)

    def grad_weight(self, x, G):
        return G.reshape(-1, G.shape[-1]).T @ x.reshape(-1, x.shape[-1])

    def grad_bias(self, G):
        return G.reshape(-1, G.shape[-1]).sum(0)

    def in_features_total(self):
        return self.in_features

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}" + self._rule_repr()


def _positive(layer: str, **sizes) -> None:
    """ValueError naming the argument unless every size is a positive int (or pair of them)."""
    for arg, v in sizes.items():
        vals = v if isinstance(v, tuple) else (v,)
        if not all(isinstance(a, int) and not isinstance(a, bool) and a >= 1 for a in vals):
            raise ValueError(f"{layer}: {arg} must be a positive integer (or a pair of them), got {v!r}")


def _padding(padding, kernel_size: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if any(k % 2 == 0 for k in kernel_size) or stride != (1, 1):
            raise ValueError(f"padding='same' needs an odd kernel and stride 1, got kernel "
                             f"{kernel_size} stride {stride}; give the padding as an int")
        return (kernel_size[0] // 2, kernel_size[1] // 2)
    if isinstance(padding, str):
        raise ValueError(f"padding must be 'same', 'valid', an int or a pair, got {padding!r}")
    return _pair(padding)


def _out_size(size: tuple[int, int], k, s, p) -> tuple[int, int]:
    return tuple((size[i] + 2 * p[i] - k[i]) // s[i] + 1 for i in range(2))


class Conv2d(FeedbackLayer):
    r"""2-d convolution :math:`a = W \star h + b` whose backward sends the error through the rule's kernel B:

    .. math:: \delta h = B^\top \star G \ \text{(the transposed convolution with B, not W)}, \qquad
              \nabla_W = G \star h \ \text{(the usual weight gradient)},

    computed together in one ``convolution_backward`` call; ``rule="bp"`` is ``torch.nn.Conv2d``'s
    backward (tested equal to it).

    Args:
        in_channels: channels of the input image.
        out_channels: channels produced by the convolution.
        kernel_size: size of the kernel, an int or ``(kh, kw)``.
        stride: stride of the convolution. Default: 1.
        padding: an int, a pair, ``"same"`` (odd kernel, stride 1) or ``"valid"``. Default: 0.
        bias: add a learnable bias. Default: True.
        rule: the feedback rule, a name or a rule object (as :class:`Linear`). Default: ``"bp"``.
        init: ``"glorot"`` or ``"torch"``.
        input_size: ``(H, W)`` of the input; needed only by rules that size matrices by the input
            (``dfa``).
        **rule_kwargs: passed to the rule's constructor.

    Shape:
        - Input: :math:`(N, C_{in}, H_{in}, W_{in})`.
        - Output: :math:`(N, C_{out}, H_{out}, W_{out})`, :math:`H_{out} = \lfloor (H_{in} + 2p - k)/s \rfloor + 1`.

    Attributes:
        weight: W, ``(out_channels, in_channels, kh, kw)``.
        bias: ``(out_channels,)`` or None.
        rule, B: as :class:`Linear` (B has W's shape).

    Example::

        >>> conv = asymlib.Conv2d(3, 32, 5, padding="same", rule="usf")
        >>> conv(torch.randn(8, 3, 32, 32)).shape
        torch.Size([8, 32, 32, 32])
        >>> torch.equal(conv.B.sign(), conv.weight.sign())    # sign symmetry
        True
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 bias: bool = True, rule: "str | FeedbackRule | None" = "bp", init: str = "glorot",
                 input_size: "tuple[int, int] | int | None" = None, **rule_kwargs):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        _positive("Conv2d", in_channels=in_channels, out_channels=out_channels, kernel_size=self.kernel_size,
                  stride=self.stride)
        self.padding = _padding(padding, self.kernel_size, self.stride)
        self.input_size = _pair(input_size) if input_size is not None else None
        if self.input_size is not None:
            _positive("Conv2d", input_size=self.input_size)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self._finish_init(rule, (out_channels,) if bias else None, init, **rule_kwargs)

    def forward_op(self, x, W, b):
        return F.conv2d(x, W, b, self.stride, self.padding)

    def grad_input(self, G, B, x_shape):
        return torch.nn.grad.conv2d_input(x_shape, B.to(G.dtype), G, self.stride, self.padding)

    def grad_weight(self, x, G):
        return torch.nn.grad.conv2d_weight(x, self.weight.shape, G, self.stride, self.padding)

    def grads(self, x, G, B, need_input):
        # one fused call: the weight gradient depends on the kernel's shape only, so passing B
        # gives delta = B^T * G and grad W = G * x together, as torch's own conv backward does
        gx, gW, _ = torch.ops.aten.convolution_backward(
            G, x, B.to(G.dtype), None, self.stride, self.padding, (1, 1), False, (0, 0), 1,
            (need_input, True, False))
        return gx, gW

    def in_features_total(self):
        if self.input_size is None:
            raise ValueError(f"Conv2d with rule {self.rule.name!r} needs input_size=(H, W)")
        return self.in_channels * self.input_size[0] * self.input_size[1]

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}" + self._rule_repr())


class LocallyConnected2d(FeedbackLayer):
    r"""Untied convolution (the report's §4): a convolution whose kernel differs at every output
    position l. With :math:`U = \mathrm{unfold}(h)` (``N x c x L``, :math:`c = C_{in} k_h k_w`):

    .. math:: a_{n,o,l} = \sum_c W_{o,l,c} U_{n,c,l}, \qquad
              \delta U_{n,c,l} = \sum_o B_{o,l,c} G_{n,o,l}, \qquad
              (\nabla W)_{o,l,c} = \sum_n G_{n,o,l} U_{n,c,l},

    and :math:`\delta h = \mathrm{fold}(\delta U)`. With every position's kernel equal to a conv kernel
    (:meth:`tie_`), the layer is that :class:`Conv2d`. Glorot's fans are a conv kernel's
    (:math:`C_{in} k^2`, :math:`C_{out} k^2`).

    Args:
        in_channels, out_channels, kernel_size, stride, padding: as :class:`Conv2d`.
        input_size: ``(H, W)`` of the input (required: each output position has its own kernel).
        bias: add a learnable bias, untied too: one per output unit. Default: True.
        rule: the feedback rule, a name or a rule object (B gets W's local structure). Default: ``"bp"``.
        init: ``"glorot"`` or ``"torch"``.
        **rule_kwargs: passed to the rule's constructor.

    Shape:
        - Input: :math:`(N, C_{in}, H, W)` with ``(H, W) = input_size``.
        - Output: :math:`(N, C_{out}, H_{out}, W_{out})`, as a convolution's.

    Attributes:
        weight: W, ``(out_channels, L, c)`` with :math:`L = H_{out} W_{out}` positions and
            :math:`c = C_{in} k_h k_w` inputs per kernel.
        bias: ``(out_channels, H_out, W_out)`` or None.
        output_size: ``(H_out, W_out)``.
        rule, B: as :class:`Linear` (B has W's shape).

    Example::

        >>> untied = asymlib.LocallyConnected2d(3, 32, 5, input_size=(32, 32), padding=2, rule="fa")
        >>> untied(torch.randn(8, 3, 32, 32)).shape
        torch.Size([8, 32, 32, 32])
        >>> untied.weight.shape                 # a 3*5*5 kernel at each of the 32*32 positions
        torch.Size([32, 1024, 75])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, input_size, stride=1,
                 padding=0, bias: bool = True, rule: "str | FeedbackRule | None" = "bp",
                 init: str = "glorot", **rule_kwargs):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        _positive("LocallyConnected2d", in_channels=in_channels, out_channels=out_channels,
                  kernel_size=self.kernel_size, stride=self.stride)
        if input_size is None:
            raise ValueError("LocallyConnected2d: input_size=(H, W) is required (each output position has "
                             "its own kernel, so the layer is built for one input size)")
        self.padding = _padding(padding, self.kernel_size, self.stride)
        self.input_size = _pair(input_size)
        _positive("LocallyConnected2d", input_size=self.input_size)
        self.output_size = _out_size(self.input_size, self.kernel_size, self.stride, self.padding)
        if min(self.output_size) < 1:
            raise ValueError(f"LocallyConnected2d: kernel {self.kernel_size} does not fit input "
                             f"{self.input_size} with padding {self.padding}")
        L = self.output_size[0] * self.output_size[1]
        c = in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.weight = nn.Parameter(torch.empty(out_channels, L, c))
        self._patch_cache = None   # the last training forward's patches, for its weight gradient
        self._scratch = {}         # reused buffers for the patches and their gradient (see _workspace)
        self._finish_init(rule, (out_channels, *self.output_size) if bias else None, init, **rule_kwargs)

    def fans(self):
        k = self.kernel_size[0] * self.kernel_size[1]
        return self.in_channels * k, self.out_channels * k

    def _unfold(self, x: Tensor) -> Tensor:
        """``unfold(x)``, ``N x c x L`` (the reference the fast path is tested against)."""
        return F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)

    # The fast path: the patches are copied once from the channels-last padded input, so each copied
    # run is kw * C_in contiguous values, in the order (kh, kw, C_in) -- W and B are permuted to match
    # (``_to_hwc``) -- and each position's product is one matrix product of a batched matmul.
    #
    # The patches and their gradient are the step's largest tensors (L*N*c values: 410 MB for the
    # untied Poggio net's second layer at batch 500), and a fresh allocation that large costs more
    # than the products here: the OS maps and zero-fills every new page (measured: 408 ms to allocate
    # and fill 410 MB, 14 ms to fill it again). So they live in buffers kept on the layer between
    # steps, each filled and consumed within one call (never handed out).
    def _workspace(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """The layer's scratch buffer ``name`` with ``shape`` (reallocated when shape, dtype or device change)."""
        ws = self._scratch.get(name)
        if ws is None or ws.shape != shape or ws.dtype != like.dtype or ws.device != like.device:
            self._scratch[name] = None                      # free the old one first
            ws = self._scratch[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return ws

    def _patches(self, x: Tensor) -> Tensor:
        """The patches as ``L x N x c`` with c in the order (kh, kw, C_in), in the layer's workspace."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        xh = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1).contiguous()      # N x Hp x Wp x C_in
        Ho, Wo = self.output_size
        n, c = x.shape[0], x.shape[1]
        s_n, s_h, s_w, s_c = xh.stride()
        view = xh.as_strided((Ho, Wo, n, kh, kw, c), (s_h * sh, s_w * sw, s_n, s_h, s_w, s_c))
        P = self._workspace("patches", (Ho, Wo, n, kh, kw, c), xh).copy_(view)
        return P.view(Ho * Wo, n, kh * kw * c)

    # The two reorderings below go in two copies each: first the small (kh*kw) x C_in transpose inside
    # every kernel (cache-resident), then the move of whole kernels. One strided copy gathers every
    # value from far away: measured on the untied Poggio net's second layer (fp32, 2 threads) 12.4 ->
    # 3.7 ms for W and 12.9 -> 4.3 ms for its gradient, the same values.
    def _to_hwc(self, W: Tensor) -> Tensor:
        """``out x L x c`` (c in unfold's order C_in, kh, kw) -> ``L x c' x out`` (c' = kh, kw, C_in)."""
        kk, o, L = self.kernel_size[0] * self.kernel_size[1], W.shape[0], W.shape[1]
        W = W.view(o, L, self.in_channels, kk).transpose(2, 3).contiguous()          # out x L x kk x C_in
        return W.permute(1, 2, 3, 0).reshape(L, kk * self.in_channels, o)

    def _from_hwc(self, gW: Tensor) -> Tensor:
        """``L x out x c'`` -> ``out x L x c`` (the inverse order of :meth:`_to_hwc`)."""
        kk, L, o = self.kernel_size[0] * self.kernel_size[1], gW.shape[0], gW.shape[1]
        gW = gW.view(L, o, kk, self.in_channels).transpose(2, 3).contiguous()        # L x out x C_in x kk
        return gW.transpose(0, 1).reshape(o, L, -1)

    def forward_op(self, x, W, b):
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(f"LocallyConnected2d built for input {self.input_size}, got {tuple(x.shape[-2:])}")
        P, Wh = self._patches(x), self._to_hwc(W)
        # training: keep the patches for the weight gradient (the backward's biggest copy otherwise), and
        # W in the patches' order for backprop's input gradient (B = W): what autograd would save
        self._patch_cache = (self._tensor_id(x), P, self._tensor_id(W), W, Wh) if self.training else None
        # a product per position (L x N x out), written straight into an N x Ho x Wo x out tensor: the
        # output is channels-last, with no copy to reorder it
        n, L = x.shape[0], P.shape[0]
        out = torch.empty(n, *self.output_size, self.out_channels, dtype=P.dtype, device=P.device)
        torch.bmm(P, Wh, out=out.view(n, L, self.out_channels).transpose(0, 1))
        a = out.permute(0, 3, 1, 2)                                         # N x out x Ho x Wo, channels-last
        return a + b if b is not None else a

    def _fold(self, dP: Tensor, x_shape) -> Tensor:
        """The adjoint of :meth:`_patches`: ``L x N x c'`` back onto the input, summing overlaps.

        The sum runs in position-major order (``H x W x N x C_in``, the order of dP's rows, so that each
        of the kh*kw adds reads and writes N*C_in contiguous values) and in fp32 whatever dP's dtype: a
        16-bit accumulator loses the overlaps' low bits, and on the CPU it is the slower one (measured:
        the untied Poggio net's second layer, bf16, 270 -> 119 ms; fp32 118 -> 83 ms, the same sums in
        the same order). The result is channels-last, in dP's dtype."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        n, c, H, W = x_shape
        Ho, Wo = self.output_size
        dP = dP.view(Ho, Wo, n, kh, kw, c)
        acc = torch.zeros(H + 2 * ph, W + 2 * pw, n, c, device=dP.device,
                          dtype=torch.float32 if dP.element_size() < 4 else dP.dtype)
        for i in range(kh):
            for j in range(kw):
                acc[i:i + sh * (Ho - 1) + 1:sh, j:j + sw * (Wo - 1) + 1:sw] += dP[:, :, :, i, j, :]
        return acc[ph:ph + H, pw:pw + W].permute(2, 3, 0, 1).to(dP.dtype, memory_format=torch.channels_last)

    @staticmethod
    def _by_position(G: Tensor) -> Tensor:
        """``N x out x Ho x Wo`` -> ``L x N x out``: a strided view of a channels-last G (the batched
        products read it as it is), else a copy."""
        n, o = G.shape[:2]
        if G.is_contiguous(memory_format=torch.channels_last):
            return G.permute(0, 2, 3, 1).reshape(n, -1, o).transpose(0, 1)
        return G.flatten(2).permute(2, 0, 1).contiguous()

    def grad_output_layout(self, G, x):
        return G      # any layout: _by_position reads a channels-last G in place

    def grad_input(self, G, B, x_shape, Gl: Tensor | None = None, Bh: Tensor | None = None):
        Gl = self._by_position(G) if Gl is None else Gl                         # L x N x out
        Bh = self._feedback_hwc(B.to(G.dtype)) if Bh is None else Bh            # L x c' x out
        dP = self._workspace("dpatches", (Gl.shape[0], Gl.shape[1], Bh.shape[1]), Gl)
        return self._fold(torch.bmm(Gl, Bh.transpose(1, 2), out=dP), x_shape)

    @staticmethod
    def _tensor_id(x: Tensor) -> tuple:
        return (x.data_ptr(), x._version, tuple(x.shape), x.dtype)

    def _feedback_hwc(self, B: Tensor) -> Tensor:
        """B in the patches' order, kept while B is unchanged: a fixed B (fa's) is permuted once. Never
        kept for a learned B (fa-updated, kp, pfa): fused optimizer steps change it in place without
        bumping its version counter."""
        if self.rule.feedback_params(self):
            return self._to_hwc(B)
        key = (B.data_ptr(), B._version, tuple(B.shape), B.stride(), B.dtype, B.device)
        hit = self._scratch.get("feedback_hwc")
        if hit is None or hit[0] != key:     # (holding B keeps its memory, so no other tensor gets its key)
            hit = self._scratch["feedback_hwc"] = (key, B, self._to_hwc(B))
        return hit[2]

    def _take_cache(self, x: Tensor, B: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """(patches, B in the patches' order) saved by the forward of ``x``, each None when not saved
        (another input, or B is not the forward's W); the cache is emptied."""
        cache, self._patch_cache = getattr(self, "_patch_cache", None), None
        if cache is None or cache[0] != self._tensor_id(x):
            return None, None
        return cache[1], (cache[4] if B is not None and self._tensor_id(B) == cache[2] else None)

    def grad_weight(self, x, G, Gl: Tensor | None = None, P: Tensor | None = None):
        if P is None:
            P = self._take_cache(x)[0]
            P = self._patches(x) if P is None else P
        Gl = self._by_position(G) if Gl is None else Gl
        return self._from_hwc(torch.bmm(Gl.transpose(1, 2), P))                 # L x out x c'

    def grads(self, x, G, B, need_input):
        P, Bh = self._take_cache(x, B)
        Gl = self._by_position(G)   # once for both products
        # the weight gradient first: it reads the patches before grad_input's workspace is filled
        gW = self.grad_weight(x, G, Gl, P)
        return (self.grad_input(G, B, x.shape, Gl, Bh) if need_input else None), gW

    def grad_bias(self, G):
        return G.sum(0)

    def in_features_total(self):
        return self.in_channels * self.input_size[0] * self.input_size[1]

    def tie_(self, kernel: Tensor) -> "LocallyConnected2d":
        """Set every position's kernel to the conv ``kernel`` (``out x in x kh x kw``)."""
        with torch.no_grad():
            self.weight.copy_(kernel.reshape(self.out_channels, 1, -1).expand_as(self.weight))
        return self

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"input_size={self.input_size}, stride={self.stride}, padding={self.padding}"
                + self._rule_repr())


def feedback_layers(model: nn.Module) -> Iterator[tuple[str, FeedbackLayer]]:
    """(name, layer) for every feedback layer of ``model``, in forward order of registration."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, FeedbackLayer))


@contextlib.contextmanager
def exact_backprop(model: nn.Module):
    """Within the block, every feedback layer of ``model`` sends back :math:`G W` (true backprop).

    Used by the alignment metrics to get backprop's delta with the same weights on the same batch.
    """
    layers = [m for _, m in feedback_layers(model)]
    saved = [m.exact for m in layers]
    for m in layers:
        m.exact = True
    try:
        yield model
    finally:
        for m, s in zip(layers, saved):
            m.exact = s
