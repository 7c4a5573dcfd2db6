"""Mixed precision: every feedback layer and every rule under torch.autocast (bf16 on the CPU here; the
same code path serves CUDA bf16/fp16). Forward and backward run in bf16; W's gradient, a learned B's
and the optimizer state stay fp32; the gradients match the fp32 formulas within bf16 tolerance, and
`bp` matches torch's own layers under the same autocast."""
import copy

import pandas as pd
import pytest
import torch
from torch import nn

import asymlib
from asymlib import layers
from asymlib.training import Config, train
from asymlib.store import ResultStore

RULES = ["bp", "fa", "fa-updated", "kp(0.01)", "usf", "brsf", "frsf", "psf(0.5)", "pfa(2)"]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def make(kind, rule):
    torch.manual_seed(0)
    if kind == "linear":
        return asymlib.Linear(24, 16, rule=rule), torch.randn(32, 24)
    if kind == "conv":
        return asymlib.Conv2d(3, 8, 3, padding=1, rule=rule, input_size=(8, 8)), torch.randn(4, 3, 8, 8)
    return asymlib.LocallyConnected2d(3, 8, 3, input_size=(8, 8), padding=1, rule=rule), torch.randn(4, 3, 8, 8)


def grads(layer, x, G, bf16: bool):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(1)   # brsf redraws its magnitudes at each training forward: the same draw both times
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = layer(x)
    assert out.dtype == (torch.bfloat16 if bf16 else torch.float32)
    out.backward(G.to(out.dtype))
    learned = [p.grad for n, p in layer.named_parameters() if n.startswith("feedback")]
    return x.grad, layer.weight.grad, layer.bias.grad, learned


@pytest.mark.parametrize("kind", ["linear", "conv", "untied"])
@pytest.mark.parametrize("rule", RULES)
def test_every_rule_under_bf16_autocast_matches_its_fp32_formula(kind, rule):
    layer, x = make(kind, rule)
    twin = copy.deepcopy(layer)
    G = torch.randn_like(layer(x))
    got = grads(twin, x, G, bf16=True)
    if rule == "brsf":   # a 16-bit backward draws M on its own grid: the formula with the M it drew
        layer.feedback_magnitude.copy_(twin.feedback_magnitude)
        layer.rule.on_forward = lambda layer: None
        layer._magnitude_stale = False
    ref = grads(layer, x, G, bf16=False)
    gx, gW, gb, learned = got
    assert gx.dtype == gW.dtype == gb.dtype == torch.float32           # master gradients stay fp32
    assert all(g.dtype == torch.float32 for g in learned)              # a learned B stays fp32
    assert rel(gx, ref[0]) < 2e-2 and rel(gW, ref[1]) < 2e-2 and rel(gb, ref[2]) < 2e-2, rule
    for a, b in zip(learned, ref[3]):
        assert rel(a, b) < 2e-2


def test_brsf_draws_16_bit_magnitudes_under_autocast_and_fp32_ones_without():
    from asymlib.rules import _uniform16_, glorot_bound
    torch.manual_seed(0)
    t = _uniform16_(torch.empty(200_000), 0.5)
    k = t / (0.5 / 2**15) - 0.5                                       # the grid's integers
    assert torch.equal(k, k.round()) and k.min() >= -2**15 and k.max() <= 2**15 - 1
    assert abs(t.mean()) < 5e-3 and abs(t.abs().mean() - 0.25) < 5e-3 and abs((t < 0).float().mean() - 0.5) < 5e-3
    assert abs((k.view(-1, 4) < 0).float().mean(0) - 0.5).max() < 1e-2, "each of a draw's four words is signed"

    layer, x = make("linear", "brsf")
    a = glorot_bound(layer.weight.shape, layer.fans())
    for bf16 in (True, False):
        torch.manual_seed(3)
        grads(layer, x, torch.randn(32, 16), bf16=bf16)
        M = layer.feedback_magnitude
        k = M.double() / (a / 2**15) - 0.5
        on_grid = bool(((k - k.round()).abs() < 1e-2).all())      # fp32 holds k to ~2^-9
        assert on_grid == bf16 and M.abs().max() <= a
        assert torch.equal(torch.sign(layer.B), torch.sign(layer.weight)), "sign-concordant either way"
    torch.manual_seed(3)
    twin, _ = make("linear", "brsf")
    grads(twin, x, torch.randn(32, 16), bf16=False)
    assert torch.equal(twin.feedback_magnitude, layer.feedback_magnitude), "fp32 draws as before"


def test_dfa_under_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    net, loss_fn = asymlib.build("Input - dense32 - dense16 - dense10", (12,), 10, rule="dfa")
    twin = copy.deepcopy(net)
    x, y = torch.randn(16, 12), torch.randint(0, 10, (16,))
    loss_fn(net(x), y).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(twin(x), y)
    loss.backward()
    for (n, p), (_, q) in zip(net.named_parameters(), twin.named_parameters()):
        # three bf16 layers deep (ReLU masks may flip): the same direction, within a few percent
        cos = torch.nn.functional.cosine_similarity(q.grad.flatten(), p.grad.flatten(), dim=0)
        assert q.grad.dtype == torch.float32 and cos > 0.995 and rel(q.grad, p.grad) < 0.1, n


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_bp_under_autocast_matches_torchs_own_layer(kind):
    torch.manual_seed(0)
    if kind == "linear":
        ours, x = asymlib.Linear(24, 16), torch.randn(32, 24)
        theirs = nn.Linear(24, 16)
    else:
        ours, x = asymlib.Conv2d(3, 8, 3, padding=1), torch.randn(4, 3, 8, 8)
        theirs = nn.Conv2d(3, 8, 3, padding=1)
    theirs.load_state_dict(ours.state_dict())
    outs, gs = [], []
    for m in (ours, theirs):
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(xx)
        out.float().square().sum().backward()
        outs.append(out)
        gs.append((xx.grad, m.weight.grad, m.bias.grad))
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    assert torch.allclose(outs[0].float(), outs[1].float(), rtol=1e-2, atol=1e-2)
    for a, b in zip(*gs):
        assert a.dtype == b.dtype and rel(a, b) < 1e-2


def test_without_autocast_nothing_is_cast():
    layer, x = make("linear", "fa")
    twin = copy.deepcopy(layer)
    a = grads(layer, x, torch.ones(32, 16), bf16=False)
    b = grads(twin, x, torch.ones(32, 16), bf16=False)
    assert all(torch.equal(p, q) for p, q in zip(a[:3], b[:3]))


def test_a_bf16_run_trains_stores_its_precision_and_keys_apart(tmp_path):
    store = ResultStore(tmp_path)
    base = dict(spec="Input - dense32 - dense10(R*)", dataset="digits", device="cpu", epochs=8, batch_size=50)
    fp32 = train(Config(**base), store, progress=False)
    bf16 = train(Config(**base, precision="bf16"), store, progress=False)
    assert Config(**base).key() != Config(**base, precision="bf16").key()
    assert bf16.status == "completed" and bf16.env["precision"] == "bf16" and fp32.env["precision"] == "fp32"
    assert bf16.final["test_acc"] > 0.5 and abs(bf16.final["test_acc"] - fp32.final["test_acc"]) < 0.1
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        train(Config(**base, precision="fp16"), store, progress=False)
    with pytest.raises(ValueError, match="precision"):
        Config(**base, precision="fp8")


def test_channels_last_flows_through_forward_and_the_fused_backward():
    torch.manual_seed(0)
    conv = asymlib.Conv2d(3, 8, 3, padding=1, rule="usf").to(memory_format=torch.channels_last)
    twin = copy.deepcopy(conv).to(memory_format=torch.contiguous_format)
    x = torch.randn(4, 3, 8, 8)
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    xn = x.clone().requires_grad_(True)
    out_c, out_n = conv(xc), twin(xn)
    assert out_c.is_contiguous(memory_format=torch.channels_last)
    out_c.sum().backward()
    out_n.sum().backward()
    assert xc.grad.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(xc.grad, xn.grad, atol=1e-5) and torch.allclose(conv.weight.grad, twin.weight.grad, atol=1e-4)


def test_the_layout_is_how_a_run_ran_not_which_run_it_is(tmp_path):
    """channels-last is recorded with the run, like the device and the threads: one key for both layouts,
    a stored run answers either, and a checkpoint resumes only in the layout that wrote it."""
    from asymlib.store import StoreError
    base = dict(spec="Input - Conv3*3*4/1 - dense10", dataset="digits", device="cpu", epochs=2, batch_size=100)
    cl, nchw = Config(**base, channels_last=True), Config(**base)
    assert cl.key() == nchw.key()
    store = ResultStore(tmp_path / "a")
    run = train(cl, store, progress=False)
    assert run.status == "completed" and run.config.channels_last
    again = train(nchw, store, progress=False)                     # stored: loaded, and says how it ran
    assert again.loaded and again.config.channels_last
    pd.testing.assert_frame_equal(again.history, run.history)
    # an interrupted channels-last run does not resume in the default layout
    store = ResultStore(tmp_path / "b")
    stop = lambda epoch, row: (_ for _ in ()).throw(KeyboardInterrupt) if epoch == 1 else None
    with pytest.raises(KeyboardInterrupt):
        train(cl, store, progress=False, on_epoch_end=stop)
    with pytest.raises(StoreError, match=r"written in channels-last.*rerun with --channels-last"):
        train(nchw, store, progress=False)
    resumed = train(cl, store, progress=False)
    assert resumed.status == "completed" and len(resumed.history) == 2


def test_pfa_computes_its_products_in_the_compute_dtype():
    """pfa's B = P R and its learned gradient P^T dW run in the autocast dtype, as the layer's own
    products do (in fp32 they cost pfa(2) four times bp's bf16 step); in fp32 nothing changes."""
    torch.manual_seed(0)
    layer = asymlib.Linear(24, 16, rule="pfa(2)")
    rule, P, R = layer.rule, layer.feedback_fixed, layer.feedback_learned.detach()
    B = rule.feedback_as(layer, torch.bfloat16)
    assert B.dtype == torch.bfloat16 and torch.equal(B, P.bfloat16() @ R.bfloat16())
    assert torch.equal(rule.feedback_as(layer, torch.float32), P @ R) and torch.equal(layer.B, P @ R)
    gW = torch.randn(16, 24)
    (gR16,) = rule.feedback_grads(layer, gW.bfloat16())
    assert gR16.dtype == torch.float32     # + λR in fp32: the learned R's gradient stays fp32
    assert torch.equal(gR16, P.T.bfloat16() @ gW.bfloat16() + rule.weight_decay * R)
    assert torch.equal(rule.feedback_grads(layer, gW)[0], P.T @ gW + rule.weight_decay * R)


@pytest.mark.parametrize("rule", ["kp(0.1)", "pfa(2)", "fa-updated"])
def test_a_grad_scaler_leaves_the_rules_own_decay_intact(rule):
    """fp16 trains with a grad scaler: the loss is multiplied by S before backward and the gradients
    divided by S after. kp's and pfa's decay, added inside the backward, must be scaled alike or it
    comes out S times too small. A CPU GradScaler runs the same arithmetic as CUDA's."""
    from asymlib.training import scaled_backward
    torch.manual_seed(0)
    net = asymlib.build("Input - dense16 - dense8 - dense10", (12,), 10, rule=rule)[0]
    x, y = torch.randn(32, 12), torch.randint(0, 10, (32,))
    ref = copy.deepcopy(net)
    nn.functional.cross_entropy(ref(x), y).backward()
    for use_scale in (True, False):
        twin = copy.deepcopy(net)
        opt = torch.optim.SGD(twin.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
        loss = nn.functional.cross_entropy(twin(x), y)
        if use_scale:
            scaled_backward(loss, scaler)
        else:               # what the loop did before: the decay added to scaled gradients
            scaler.scale(loss).backward()
        scaler.unscale_(opt)
        ok = all(torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7)
                 for p, q in zip(twin.parameters(), ref.parameters()))
        assert ok == (use_scale or rule == "fa-updated"), (rule, use_scale)   # fa-updated has no decay


def test_gradient_scale_rejects_a_bad_scale():
    with pytest.raises(ValueError, match="finite number > 0"):
        with asymlib.rules.gradient_scale(float("inf")):
            pass
