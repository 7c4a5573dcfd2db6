"""Every rule on every layer type against the formulas computed by hand."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asymlib
from asymlib.rules import RULES, DirectFeedback



@pytest.fixture(autouse=True)
def float64():
    """The hand formulas are compared at 1e-10."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)

ELEMENTWISE_RULES = ["bp", "fa", "fa-updated", "kp", "usf", "brsf", "frsf", "psf(0.25)", "pfa(2)"]


def make(kind, rule, bias=False, stride=1, padding=1):
    if kind == "linear":
        return asymlib.Linear(7, 5, bias=bias, rule=rule), torch.randn(6, 7)
    if kind == "conv":
        return asymlib.Conv2d(3, 4, 3, stride, padding, bias=bias, rule=rule), torch.randn(2, 3, 6, 6)
    return (asymlib.LocallyConnected2d(3, 4, 3, (6, 6), stride, padding, bias=bias, rule=rule),
            torch.randn(2, 3, 6, 6))


def hand_grads(layer, x, G):
    """(input grad, weight grad) by explicit matrix products with layer.B, independent of the layer."""
    B = layer.B
    if isinstance(layer, asymlib.Linear):
        return G @ B, G.T @ x
    k, s, p = layer.kernel_size, layer.stride, layer.padding
    U = F.unfold(x, k, padding=p, stride=s)                       # N x c x L
    Gf = G.flatten(2)                                             # N x out x L
    if isinstance(layer, asymlib.Conv2d):
        Bf = B.reshape(B.shape[0], -1)                            # out x c
        dU = torch.stack([Bf.T @ Gf[n] for n in range(len(x))])
        gW = sum(Gf[n] @ U[n].T for n in range(len(x))).view_as(layer.weight)
    else:  # one matrix per output position l
        L = U.shape[2]
        dU = torch.stack([torch.stack([B[:, l, :].T @ Gf[n, :, l] for l in range(L)], 1)
                          for n in range(len(x))])
        gW = torch.stack([sum(torch.outer(Gf[n, :, l], U[n, :, l]) for n in range(len(x)))
                          for l in range(L)], 1)
    return F.fold(dU, x.shape[-2:], k, padding=p, stride=s), gW


@pytest.mark.parametrize("kind", ["linear", "conv", "lc"])
@pytest.mark.parametrize("rule", ELEMENTWISE_RULES)
def test_input_and_weight_gradients_match_hand_formula(kind, rule):
    torch.manual_seed(0)
    layer, x = make(kind, rule)
    x.requires_grad_(True)
    y = layer(x)
    G = torch.randn_like(y)
    y.backward(G)
    dx, gW = hand_grads(layer, x.detach(), G)
    torch.testing.assert_close(x.grad, dx, rtol=1e-10, atol=1e-10)
    lam = getattr(layer.rule, "weight_decay", 0.0)
    torch.testing.assert_close(layer.weight.grad, gW + lam * layer.weight.detach(), rtol=1e-10, atol=1e-10)
    if rule in ("fa-updated", "kp"):  # B receives W's gradient (plus its own decay for kp)
        torch.testing.assert_close(layer.feedback_weight.grad,
                                   gW + lam * layer.feedback_weight.detach())
    if rule.startswith("pfa"):
        P, R = layer.feedback_fixed, layer.feedback_learned
        torch.testing.assert_close(R.grad, P.T @ gW.reshape(gW.shape[0], -1) + lam * R.detach())


@pytest.mark.parametrize("kind", ["linear", "conv", "lc"])
def test_each_rule_B_has_its_defining_structure(kind):
    torch.manual_seed(1)
    W_of = lambda layer: layer.weight.detach()
    for rule in ["usf", "frsf", "brsf", "psf(1)"]:
        layer, _ = make(kind, rule)
        assert torch.equal(torch.sign(layer.B), torch.sign(W_of(layer))), rule
    layer, _ = make(kind, "usf")
    assert torch.allclose(layer.B.abs(), layer.B.abs().flatten()[0].expand_as(layer.B))
    for p in (0.0, 0.25, 0.5, 1.0):
        layer, _ = make(kind, f"psf({p})")
        frac = (torch.sign(layer.B) == torch.sign(W_of(layer))).double().mean().item()
        assert frac == pytest.approx(round(p * layer.weight.numel()) / layer.weight.numel())
    layer, x = make(kind, "fa")
    assert not torch.equal(torch.sign(layer.B), torch.sign(W_of(layer)))
    assert "feedback_weight" in dict(layer.named_buffers())  # fixed: a buffer, no optimizer sees it
    layer, _ = make(kind, "fa-updated")
    assert "feedback_weight" in dict(layer.named_parameters())


def test_brsf_redraws_magnitudes_every_training_batch_frsf_keeps_them():
    torch.manual_seed(2)
    br, x = make("linear", "brsf")
    fr, _ = make("linear", "frsf")
    B0, F0 = br.B.clone(), fr.B.clone()
    br(x), fr(x)
    assert not torch.equal(br.B, B0) and torch.equal(fr.B, F0)
    B1 = br.B.clone()
    assert torch.equal(br.B, B1), "one draw per batch, however often B is read"
    br.eval(); br(x)
    assert torch.equal(br.B, B1), "no redraw in eval mode"
    # the batch's backward uses that batch's draw, and a layer whose delta is not needed draws nothing
    br.train()
    y = br(x.requires_grad_(True))
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, torch.ones_like(y) @ br.B)
    first, _ = make("linear", "brsf")
    x0 = torch.randn(6, 7)                          # no grad: the layer's delta is never needed
    state = torch.get_rng_state()
    first(x0).sum().backward()
    assert torch.equal(torch.get_rng_state(), state), "no draw for a B that is never used"
    first(x0).sum().backward()
    first.B
    assert not torch.equal(torch.get_rng_state(), state), "reading B draws the batch's M"


@pytest.mark.parametrize("bias", [False, True])
def test_bp_linear_matches_torch_autograd(bias):
    torch.manual_seed(3)
    ref = nn.Linear(7, 5, bias=bias)
    layer = asymlib.Linear(7, 5, bias=bias, rule="bp")
    with torch.no_grad():
        layer.weight.copy_(ref.weight)
        if bias:
            layer.bias.copy_(ref.bias)
    x1 = torch.randn(4, 3, 7, requires_grad=True)  # extra leading dims, like nn.Linear
    x2 = x1.detach().clone().requires_grad_(True)
    (ref(x1) ** 2).sum().backward()
    (layer(x2) ** 2).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=0, atol=1e-6)
    if bias:
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 2), (2, 1)])
def test_bp_conv_matches_torch_autograd(stride, padding):
    torch.manual_seed(4)
    ref = nn.Conv2d(3, 4, 5, stride, padding, bias=True)
    layer = asymlib.Conv2d(3, 4, 5, stride, padding, bias=True, rule="bp")
    with torch.no_grad():
        layer.weight.copy_(ref.weight)
        layer.bias.copy_(ref.bias)
    x1 = torch.randn(2, 3, 9, 9, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    (ref(x1) ** 2).sum().backward()
    (layer(x2) ** 2).sum().backward()
    for a, b in [(x2.grad, x1.grad), (layer.weight.grad, ref.weight.grad), (layer.bias.grad, ref.bias.grad)]:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 2), (2, 1), (2, 0)])
def test_tied_locally_connected_equals_conv(stride, padding):
    torch.manual_seed(5)
    conv = asymlib.Conv2d(3, 4, 3, stride, padding, bias=False)
    lc = asymlib.LocallyConnected2d(3, 4, 3, (7, 7), stride, padding, bias=False).tie_(conv.weight.detach())
    x1 = torch.randn(2, 3, 7, 7, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = conv(x1), lc(x2)
    torch.testing.assert_close(y2, y1, rtol=0, atol=1e-10)
    G = torch.randn_like(y1)
    y1.backward(G), y2.backward(G)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=0, atol=1e-10)
    # the conv's weight gradient is the sum of the untied kernels' gradients over positions
    torch.testing.assert_close(lc.weight.grad.sum(1).view_as(conv.weight), conv.weight.grad, rtol=0, atol=1e-10)


def test_dfa_deltas_are_error_times_B_times_fprime():
    torch.manual_seed(6)
    net, loss_fn = asymlib.build("Input - dense8 - dense6 - dense3", in_shape=(5,), num_classes=3,
                                 rule="dfa", bias=True)
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 1])
    l1, l2, l3 = [m for _, m in asymlib.feedback_layers(net)]
    a = {}

    def keep(name):
        def hook(module, inputs, output):
            output.retain_grad()
            a[name] = output
        return hook

    for name, layer in (("1", l1), ("2", l2), ("3", l3)):
        layer.register_forward_hook(keep(name))
    out = net(x)
    loss = loss_fn(out, y)
    loss.backward()
    e = (torch.softmax(out, 1) - F.one_hot(y, 3)) / len(y)  # dL/dy for mean cross-entropy
    torch.testing.assert_close(a["3"].grad, e)
    for name, layer_above in (("2", l3), ("1", l2)):
        expected = (e @ layer_above.B) * (a[name] > 0)
        torch.testing.assert_close(a[name].grad, expected.detach())
    assert l1.B.shape == (3, 5) and l2.B.shape == (3, 8)
    # weight gradient stays G^T h
    h1 = F.relu(a["1"]).detach()
    torch.testing.assert_close(l2.weight.grad, a["2"].grad.T @ h1)


def test_dfa_without_tap_is_a_clear_error():
    layer = asymlib.Linear(4, 3, rule=DirectFeedback(3))
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="tap"):
        layer(x).sum().backward()


def test_dfa_conv_and_untied_shapes():
    torch.manual_seed(7)
    net, loss_fn = asymlib.build("Input - Conv3*3*4/1 - Untied3*3*4/1 - dense10", in_shape=(2, 6, 6), rule="dfa")
    x = torch.randn(3, 2, 6, 6, requires_grad=True)
    loss_fn(net(x), torch.tensor([1, 2, 3])).backward()
    conv = net[0]
    torch.testing.assert_close(x.grad, (net[-1].rule.error @ conv.B).view_as(x))


def test_fa_updated_keeps_B_minus_W_constant_under_adam():
    torch.manual_seed(8)
    net, loss_fn = asymlib.build("Input - dense16 - dense16(R*) - dense4(R*)", in_shape=(8,), num_classes=4)
    layers = [m for _, m in asymlib.feedback_layers(net) if m.rule.name == "fa-updated"]
    diff0 = [(m.feedback_weight - m.weight).detach().clone() for m in layers]
    opt = asymlib.make_optimizer("adam", net.parameters())
    for _ in range(20):
        opt.zero_grad()
        loss_fn(net(torch.randn(32, 8)), torch.randint(0, 4, (32,))).backward()
        opt.step()
    for m, d0 in zip(layers, diff0):
        assert not torch.equal(m.weight, m.feedback_weight)
        torch.testing.assert_close(m.feedback_weight - m.weight, d0, rtol=0, atol=1e-12)


def test_kolen_pollack_contracts_B_minus_W_under_sgd():
    torch.manual_seed(9)
    lam, lr = 0.1, 0.05
    layer = asymlib.Linear(6, 4, rule=asymlib.rules.KolenPollack(lam))
    opt = torch.optim.SGD(layer.parameters(), lr=lr)
    for _ in range(10):
        d_before = (layer.feedback_weight - layer.weight).detach().clone()
        opt.zero_grad()
        layer(torch.randn(5, 6, requires_grad=True)).pow(2).sum().backward()
        opt.step()
        torch.testing.assert_close(layer.feedback_weight - layer.weight, (1 - lr * lam) * d_before)


def test_pfa_larger_expansion_tracks_W_better():
    """With SGD, Delta(PR) = P P^T Delta W: the larger n_mid, the closer P P^T is to I."""
    errs = []
    for k in (1, 50):
        torch.manual_seed(10)
        layer = asymlib.Linear(6, 4, rule=asymlib.rules.ProductFeedback(k, weight_decay=0.0))
        B0, W0 = layer.B.clone(), layer.weight.detach().clone()
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            layer(torch.randn(5, 6, requires_grad=True)).pow(2).sum().backward()
            opt.step()
        dB, dW = layer.B - B0, layer.weight.detach() - W0
        errs.append(((dB - dW).norm() / dW.norm()).item())
    assert errs[1] < errs[0] and errs[1] < 0.35


def test_rule_names_and_errors():
    assert set(RULES) == {"bp", "fa", "fa-updated", "kp", "usf", "brsf", "frsf", "psf", "dfa", "pfa"}
    assert asymlib.get_rule("psf(0.75)").p == 0.75
    assert asymlib.get_rule("PFA(5)").expansion == 5
    with pytest.raises(ValueError, match="accepted: bp, fa, fa-updated"):
        asymlib.get_rule("feedback")
    for bad in (-0.1, 1.5, "x"):
        with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\]|not a number"):
            asymlib.get_rule(f"psf({bad})") if isinstance(bad, str) else asymlib.rules.PartialSignFeedback(bad)
    with pytest.raises(ValueError, match="takes no parameter"):
        asymlib.get_rule("fa(3)")
    with pytest.raises(ValueError, match="unknown feedback rule"):
        asymlib.Linear(3, 2, rule="sign")
    with pytest.raises(ValueError, match="input_size"):
        asymlib.Conv2d(3, 4, 3, rule="dfa")


def test_repr_names_the_rule():
    assert "rule=psf(0.25)" in repr(asymlib.Linear(3, 2, rule="psf(0.25)"))
    assert "rule=fa" in repr(asymlib.Conv2d(3, 2, 3, rule="fa"))


def test_the_layers_docstring_examples_run():
    import doctest
    import asymlib
    import asymlib.layers as L
    for cls in (L.Linear, L.Conv2d, L.LocallyConnected2d):
        finder = doctest.DocTestFinder(recurse=False)
        for t in finder.find(cls, cls.__name__, globs={"asymlib": asymlib, "torch": torch}):
            assert t.examples, cls.__name__
            result = doctest.DocTestRunner().run(t)
            assert result.failed == 0, cls.__name__


@pytest.mark.parametrize("stride,padding,kernel", [(1, 2, 5), (2, 1, 3), (1, (1, 2), (3, 5)), (2, 0, (2, 3))])
def test_untied_fast_path_matches_the_unfold_formula(stride, padding, kernel):
    """LocallyConnected2d computes with batched products over positions and a strided patch copy; the
    unfold/einsum formula of its docstring is the reference."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    lc = asymlib.LocallyConnected2d(3, 4, kernel, (9, 8), stride, padding, bias=False, rule="fa").double()
    x = torch.randn(5, 3, 9, 8, dtype=torch.float64, requires_grad=True)
    out = lc(x)
    U = lc._unfold(x.detach())
    ref = torch.einsum("olc,ncl->nol", lc.weight.detach(), U).reshape(out.shape)
    assert torch.allclose(out, ref, atol=1e-12)
    G = torch.randn_like(out)
    out.backward(G)
    B = lc.B.double()
    gx = F.fold(torch.einsum("olc,nol->ncl", B, G.flatten(2)), (9, 8), lc.kernel_size, padding=lc.padding,
                stride=lc.stride)
    gw = torch.einsum("nol,ncl->olc", G.flatten(2), U)
    assert torch.allclose(x.grad, gx, atol=1e-12) and torch.allclose(lc.weight.grad, gw, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stride", [1, 2])
def test_untied_fold_of_16_bit_patches_sums_in_fp32(dtype, stride):
    """The fold (the untied input gradient's sum over overlapping patches) of 16-bit patch gradients is
    the fp32 fold rounded once: no low bits lost in the kh*kw partial sums; channels-last, in dP's dtype."""
    torch.manual_seed(0)
    lc = asymlib.LocallyConnected2d(6, 4, 5, (11, 11), stride, 2, rule="bp")
    L = lc.output_size[0] * lc.output_size[1]
    dP = torch.randn(L, 7, 25 * 6).to(dtype)
    shape = (7, 6, 11, 11)

    def fold(dP):
        acc = lc._accumulator(shape, dP)
        lc._fold(dP, acc, (0, lc.output_size[0], 0, lc.output_size[1]))
        return lc._unpad(acc, shape, dP.dtype)
    got = fold(dP)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, fold(dP.float()).to(dtype))


@pytest.mark.parametrize("rows,bands", [(0.5, 8), (1, 4), (3, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_untied_bands_give_the_whole_layer_products(rows, bands, dtype):
    """The untied layer runs its products and its fold one band of output rows at a time; the band
    size (pieces of a row with a shorter last piece, one row, a few rows with a shorter last band, the
    whole layer) changes no value beyond the order of the fold's fp32 sums."""
    torch.manual_seed(0)
    ref = asymlib.LocallyConnected2d(5, 4, 3, (7, 6), (2, 1), 1, rule="fa").to(dtype)
    lc = copy.deepcopy(ref)
    row_bytes = ref.output_size[1] * 3 * ref.weight.shape[2] * ref.weight.element_size()  # a row's patches
    lc.band_bytes = {"cpu": int(rows * row_bytes), "default": int(rows * row_bytes)}
    ref.band_bytes = {"cpu": 1 << 40, "default": 1 << 40}
    assert len(lc._bands(3, ref.weight)) == bands and len(ref._bands(3, ref.weight)) == 1
    x = torch.randn(3, 5, 7, 6, dtype=dtype)
    G = torch.randn(3, 4, *ref.output_size, dtype=dtype)
    grads = []
    for m in (ref, lc):
        xi = x.clone().requires_grad_()
        out = m(xi)
        out.backward(G)
        grads.append((out.detach(), xi.grad, m.weight.grad))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **tol)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][2], grads[1][2])


@pytest.mark.parametrize("rule", ["usf", "frsf", "brsf", "psf(0.25)"])
def test_sign_rules_feedback_is_exactly_magnitude_times_sign(rule):
    """B is built with one copysign pass; it must equal the docstring's |M| * sign(W) bit for bit."""
    from asymlib.rules import glorot_std
    torch.manual_seed(0)
    layer = asymlib.Linear(64, 32, bias=False, rule=rule)
    layer(torch.randn(3, 64))   # a training forward: brSF redraws M (when B is next used)
    B = layer.B
    W = layer.weight.detach()
    mag = (layer.feedback_magnitude.abs() if hasattr(layer, "feedback_magnitude")
           else torch.full_like(W, glorot_std(W.shape, layer.fans())))
    expected = mag * torch.sign(W)
    if hasattr(layer, "feedback_concordance"):
        expected = layer.feedback_concordance * expected
    assert torch.equal(B, expected) and torch.equal(layer.B, B)


@pytest.mark.parametrize("rule", ["bp", "fa"])
def test_untied_saved_patches_and_workspaces_never_serve_another_input(rule):
    """LocallyConnected2d keeps a training forward's patches (and, for bp, W in the patches' order) for
    the backward, in buffers reused across calls. Two training forwards before one backward, with an
    eval forward of another batch size in between, must still give each input its own gradients."""
    torch.manual_seed(0)
    lc = asymlib.LocallyConnected2d(3, 4, 3, (6, 6), 1, 1, bias=False, rule=rule).double()
    x1, x2 = (torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    y1, y2 = lc(x1), lc(x2)
    lc.eval()
    lc(torch.randn(5, 3, 6, 6, dtype=torch.float64))
    lc.train()
    G1, G2 = torch.randn_like(y1), torch.randn_like(y2)
    ((y1 * G1).sum() + (y2 * G2).sum()).backward()
    (dx1, gW1), (dx2, gW2) = hand_grads(lc, x1.detach(), G1), hand_grads(lc, x2.detach(), G2)
    torch.testing.assert_close(x1.grad, dx1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x2.grad, dx2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lc.weight.grad, gW1 + gW2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rule", ["fa", "fa-updated", "frsf"])
def test_untied_kept_feedback_follows_every_change_of_B(rule):
    """The untied layer keeps a fixed B in its patch order between steps; an in-place change of B
    (a load, a hand edit) or an optimizer step of a learned B must be seen by the next backward."""
    torch.manual_seed(0)
    lc = asymlib.LocallyConnected2d(3, 4, 3, (6, 6), 1, 1, bias=False, rule=rule).double()
    opt = asymlib.make_optimizer("adam", lc.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
        y = lc(x)
        G = torch.randn_like(y)
        y.backward(G)
        torch.testing.assert_close(x.grad, hand_grads(lc, x.detach(), G)[0], rtol=1e-10, atol=1e-10)
        opt.step()
        opt.zero_grad()
        if rule == "fa":
            with torch.no_grad():
                lc.feedback_weight.mul_(-0.5)
