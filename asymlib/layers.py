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
        self._forward_cache = None   # the last training forward's padded input (and W in patch order), for its backward
        self._scratch = {}         # reused buffers for the patches and their gradient (see _workspace)
        self._finish_init(rule, (out_channels, *self.output_size) if bias else None, init, **rule_kwargs)

    def fans(self):
        k = self.kernel_size[0] * self.kernel_size[1]
        return self.in_channels * k, self.out_channels * k

    def _unfold(self, x: Tensor) -> Tensor:
        """``unfold(x)``, ``N x c x L`` (the reference the fast path is tested against)."""
        return F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)

    # The fast path works on one band of output positions at a time (whole rows, or pieces of one row:
    # ``_bands``). For a band, the patches are copied from
    # the channels-last padded input (each copied run is kw * C_in contiguous values, in the order
    # (kh, kw, C_in); W and B are permuted to match, ``_to_hwc``), each position's product is one matrix
    # product of a batched matmul on contiguous operands, and the input gradient's overlapping patches
    # are summed into an fp32 accumulator before the next band. Whole-layer patches are the step's
    # largest tensors (L*N*c values: 410 MB for the untied Poggio net's second layer at batch 500, in
    # fp32); a band's stay in the CPU's cache, and the backward copies them again from the input instead
    # of keeping them from the forward. Measured on the untied Poggio net (bp, batch 500, 2 threads,
    # median step of 3 interleaved rounds against whole-layer patches, on a VM whose step times vary by
    # up to 40% from one run to the next): fp32 917 -> 781 ms, bf16 656 -> 541 ms; peak memory of a
    # step 2.7 -> 1.5 GB (fp32), 2.0 -> 1.45 GB (bf16); the band size (4-64 MB) moved nothing beyond the
    # noise, so ``band_bytes`` takes the least memory. G is copied into each band in position-major
    # order: the products read a strided G (a channels-last G puts a kernel's rows far apart) 1.7-2.5x
    # slower.
    #
    # Tried and not taken (the untied Poggio net's three layers, batch 500, 2 threads, median of 3 rounds): an
    # implicit product without the patch copies, one batched product per output row and kernel row on a
    # strided view of the padded input (kw * C_in contiguous values a row, which MKL's fp32 product reads
    # in place). Forward, this path -> that one: fp32 60 -> 77 ms (3 channels: K = kw * C_in = 15 is too
    # short), 88 -> 72 ms (32 channels), 44 -> 37 ms (64); bf16 26 -> 77, 42 -> 45, 20 -> 17 ms (oneDNN's
    # bf16 product copies a strided operand itself). Against the tied channels-last conv's forward (19, 34,
    # 18 ms fp32; 5, 11, 6 ms bf16) neither is within 2x.
    #
    # The buffers of a band live on the layer between steps (a fresh allocation costs the OS's page
    # mapping and zero-fill every time), each filled and consumed within one call (never handed out).

    #: the target size in bytes of a band's patches; on the CPU a band of a few cache-sized megabytes,
    #: on a GPU (whose products want large batches, and whose memory is fast) the whole layer at once
    band_bytes: dict = {"cpu": 8 << 20, "default": 1 << 40}

    def _workspace(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """The layer's scratch buffer ``name`` with ``shape`` (reallocated when shape, dtype or device change)."""
        ws = self._scratch.get(name)
        if ws is None or ws.shape != shape or ws.dtype != like.dtype or ws.device != like.device:
            self._scratch[name] = None                      # free the old one first
            ws = self._scratch[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return ws

    def _bands(self, n: int, like: Tensor) -> list[tuple[int, int, int, int]]:
        """The bands ``(y0, y1, x0, x1)`` of output positions the products run on, for a batch of n:
        whole rows, or pieces of one row when a row's patches exceed ``band_bytes``. Positions
        ``y0*Wo + x0`` to ``(y1-1)*Wo + x1`` (exclusive), a contiguous range of W's."""
        Ho, Wo = self.output_size
        target = self.band_bytes.get(like.device.type, self.band_bytes["default"])
        per_position = n * self.weight.shape[2] * like.element_size()
        cols = max(1, min(Wo, target // per_position))
        if cols < Wo:
            return [(y, y + 1, x0, min(Wo, x0 + cols)) for y in range(Ho) for x0 in range(0, Wo, cols)]
        rows = max(1, min(Ho, target // (Wo * per_position)))
        return [(y0, min(Ho, y0 + rows), 0, Wo) for y0 in range(0, Ho, rows)]

    def _padded(self, x: Tensor) -> Tensor:
        """The input padded, as a contiguous ``N x Hp x Wp x C_in`` tensor (the patches' source)."""
        (ph, pw) = self.padding
        return F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1).contiguous()

    def _band_buffer(self, name: str, band, size: tuple[int, int], inner: tuple[int, ...], like: Tensor) -> Tensor:
        """The workspace ``name`` cut to ``band`` (``size`` = the largest band's rows x columns), as
        ``rows x columns x inner``; contiguous (a band of pieces of a row is one row)."""
        y0, y1, x0, x1 = band
        return self._workspace(name, (*size, *inner), like)[: y1 - y0, : x1 - x0]

    def _patches(self, xh: Tensor, band, size) -> Tensor:
        """The patches of ``band`` (see :meth:`_bands`) as ``positions x N x c`` (c in the order kh, kw,
        C_in), in the layer's workspace; ``xh`` from :meth:`_padded`."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        y0, y1, x0, x1 = band
        n, c = xh.shape[0], xh.shape[3]
        s_n, s_h, s_w, s_c = xh.stride()
        view = xh.as_strided((y1 - y0, x1 - x0, n, kh, kw, c), (s_h * sh, s_w * sw, s_n, s_h, s_w, s_c),
                             xh.storage_offset() + y0 * sh * s_h + x0 * sw * s_w)
        P = self._band_buffer("patches", band, size, (n, kh, kw, c), xh).copy_(view)
        return P.view(-1, n, kh * kw * c)

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
        xh, Wh = self._padded(x), self._to_hwc(W)
        # training: keep the padded input (the backward copies its patches again from it, band by band),
        # and W in the patches' order for backprop's input gradient (B = W): what autograd would save
        self._forward_cache = (self._tensor_id(x), xh, self._tensor_id(W), W, Wh) if self.training else None
        n, o = x.shape[0], self.out_channels
        bands, size = self._bands_and_size(n, xh)
        out = torch.empty(n, *self.output_size, o, dtype=xh.dtype, device=xh.device)   # channels-last
        for band in bands:
            y0, y1, x0, x1 = band
            l0, l1 = self._positions(band)
            prod = self._band_buffer("products", band, size, (n, o), xh)
            torch.bmm(self._patches(xh, band, size), Wh[l0:l1], out=prod.view(-1, n, o))
            out[:, y0:y1, x0:x1].copy_(prod.permute(2, 0, 1, 3))
        a = out.permute(0, 3, 1, 2)                                         # N x out x Ho x Wo, channels-last
        return a + b if b is not None else a

    def _bands_and_size(self, n: int, like: Tensor):
        """:meth:`_bands` and the largest band's (rows, columns), the workspaces' size."""
        bands = self._bands(n, like)
        return bands, (bands[0][1] - bands[0][0], bands[0][3] - bands[0][2])

    def _positions(self, band) -> tuple[int, int]:
        """The range of positions (W's second index) of ``band``."""
        Wo = self.output_size[1]
        return band[0] * Wo + band[2], (band[1] - 1) * Wo + band[3]

    def _fold(self, dP: Tensor, acc: Tensor, band) -> None:
        """The adjoint of :meth:`_patches`: adds the patch gradients ``dP`` (``positions x N x c'``) of
        ``band`` onto ``acc``, the padded input's gradient (``Hp x Wp x N x C_in``), summing overlaps.
        Each of the kh*kw adds reads and writes N*C_in contiguous values; the accumulator is fp32
        whatever dP's dtype (:meth:`_accumulator`)."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        y0, y1, x0, x1 = band
        dP = dP.view(y1 - y0, x1 - x0, acc.shape[2], kh, kw, acc.shape[3])
        for i in range(kh):
            for j in range(kw):
                acc[y0 * sh + i:(y1 - 1) * sh + i + 1:sh, x0 * sw + j:(x1 - 1) * sw + j + 1:sw] += dP[:, :, :, i, j, :]

    def _accumulator(self, x_shape, like: Tensor) -> Tensor:
        """A zeroed padded-input gradient for :meth:`_fold`: ``Hp x Wp x N x C_in``, fp32 for 16-bit
        patch gradients: a 16-bit accumulator loses the overlaps' low bits, and on the CPU it is the
        slower one (measured: the untied Poggio net's second layer, bf16, 270 -> 119 ms)."""
        (ph, pw), (n, c, H, W) = self.padding, x_shape
        return torch.zeros(H + 2 * ph, W + 2 * pw, n, c, device=like.device,
                           dtype=torch.float32 if like.element_size() < 4 else like.dtype)

    def _unpad(self, acc: Tensor, x_shape, dtype: torch.dtype) -> Tensor:
        """The input's gradient from the accumulator: channels-last ``N x C_in x H x W`` in ``dtype``."""
        (ph, pw), (H, W) = self.padding, x_shape[2:]
        return acc[ph:ph + H, pw:pw + W].permute(2, 3, 0, 1).to(dtype, memory_format=torch.channels_last)

    def _backward(self, G: Tensor, x_shape, xh: Tensor | None, Bh: Tensor | None
                  ) -> tuple[Tensor | None, Tensor | None]:
        """(input gradient through ``Bh`` or None, weight gradient from ``xh`` or None), band by band:
        ``Bh`` is B in the patches' order (:meth:`_feedback_hwc`), ``xh`` the padded input (:meth:`_padded`)."""
        n, o = G.shape[:2]
        bands, size = self._bands_and_size(n, G)
        Gh = G.permute(2, 3, 0, 1)                                      # Ho x Wo x N x out, a view
        gW = None if xh is None else torch.empty(self.weight.shape[1], o, self.weight.shape[2],
                                                  dtype=G.dtype, device=G.device)
        acc = None if Bh is None else self._accumulator(x_shape, G)
        for band in bands:
            y0, y1, x0, x1 = band
            l0, l1 = self._positions(band)
            Gl = self._band_buffer("grad_out", band, size, (n, o), G).copy_(Gh[y0:y1, x0:x1]).view(-1, n, o)
            if gW is not None:
                torch.bmm(Gl.transpose(1, 2), self._patches(xh, band, size), out=gW[l0:l1])
            if acc is not None:
                c = Bh.shape[1]
                dP = torch.bmm(Gl, Bh[l0:l1].transpose(1, 2),
                               out=self._band_buffer("dpatches", band, size, (n, c), G).view(-1, n, c))
                if dP.dtype != acc.dtype and dP.device.type == "cpu":   # 16-bit: one cast into a kept fp32
                    # buffer, then fp32 adds (the CPU's mixed-dtype add is its slower path: measured 6.7 -> 1.9
                    # + 2.3 ms a band, bf16, 1 thread; a GPU's casts inside the add, with no buffer)
                    dP = self._band_buffer("dpatches32", band, size, (n, c), acc).view(-1, n, c).copy_(dP)
                self._fold(dP, acc, band)
        return (None if acc is None else self._unpad(acc, x_shape, G.dtype),
                None if gW is None else self._from_hwc(gW))

    def grad_output_layout(self, G, x):
        return G      # any layout: each band's G is copied in position-major order

    def grad_input(self, G, B, x_shape):
        return self._backward(G, x_shape, None, self._feedback_hwc(B.to(G.dtype)))[0]

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
        """(padded input, B in the patches' order) saved by the forward of ``x``, each None when not
        saved (another input, or B is not the forward's W); the cache is emptied."""
        cache, self._forward_cache = getattr(self, "_forward_cache", None), None
        if cache is None or cache[0] != self._tensor_id(x):
            return None, None
        return cache[1], (cache[4] if B is not None and self._tensor_id(B) == cache[2] else None)

    def grad_weight(self, x, G):
        xh = self._take_cache(x)[0]
        return self._backward(G, x.shape, self._padded(x) if xh is None else xh, None)[1]

    def grads(self, x, G, B, need_input):
        xh, Bh = self._take_cache(x, B if need_input else None)
        xh = self._padded(x) if xh is None else xh
        Bh = (self._feedback_hwc(B.to(G.dtype)) if Bh is None else Bh) if need_input else None
        return self._backward(G, x.shape, xh, Bh)

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
