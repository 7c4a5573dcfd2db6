"""build() on the report's own strings, losses, optimizers, clipping and metrics."""
import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asymlib

SHALLOW = "Input - dense512 - dense256{a} - dense10{b} - softmax - {loss}"
DEEP = "Input - dense512 - dense512{a} - dense256{a} - dense256{b} - dense10{c} - softmax - {loss}"
POGGIO = ("Input - Conv5*5*32/1 - Maxpool3*3/2 - Conv5*5*64/1 - Avgpool3*3/2 - Conv5*5*64/1 - "
          "Avgpool3*3/2 - dense128{a} - dense10{b} - softmax - {loss}")
UNTIED = POGGIO.replace("Conv", "Untied")


def widths(net):
    return [(m.in_features, m.out_features) if isinstance(m, asymlib.Linear) else
            (m.in_channels, m.out_channels) for _, m in asymlib.feedback_layers(net)]


def rules_of(net):
    return [m.rule.name for _, m in asymlib.feedback_layers(net)]


# The rows of Tables 1-4 with the rules their marks give.
TABLE_ROWS = [
    (SHALLOW.format(a="", b="", loss="crossentropy"), ["bp"] * 3),
    (SHALLOW.format(a="", b="(R)", loss="crossentropy"), ["bp", "bp", "fa"]),
    (SHALLOW.format(a="(R)", b="(R)", loss="hingeloss"), ["bp", "fa", "fa"]),
    (SHALLOW.format(a="", b="(R*)", loss="crossentropy"), ["bp", "bp", "fa-updated"]),
    (SHALLOW.format(a="(R\\*)", b="(R\\*)", loss="hingeloss"), ["bp", "fa-updated", "fa-updated"]),
    (DEEP.format(a="", b="", c="", loss="crossentropy"), ["bp"] * 5),
    (DEEP.format(a="", b="", c="(R)", loss="crossentropy"), ["bp"] * 4 + ["fa"]),
    (DEEP.format(a="", b="(R)", c="(R)", loss="hingeloss"), ["bp"] * 3 + ["fa"] * 2),
    (DEEP.format(a="(R)", b="(R)", c="(R)", loss="crossentropy"), ["bp"] + ["fa"] * 4),
    (DEEP.format(a="(R*)", b="(R*)", c="(R)", loss="crossentropy"), ["bp"] + ["fa-updated"] * 3 + ["fa"]),
    (POGGIO.format(a="", b="", loss="crossentropy"), ["bp"] * 5),
    (POGGIO.format(a="", b="(R)", loss="hingeloss"), ["bp"] * 4 + ["fa"]),
    (POGGIO.format(a="(R*)", b="(R*)", loss="crossentropy"), ["bp"] * 3 + ["fa-updated"] * 2),
    (UNTIED.format(a="", b="", loss="crossentropy"), ["bp"] * 5),
    (UNTIED.format(a="(R)", b="(R)", loss="crossentropy"), ["bp"] * 3 + ["fa"] * 2),
    (UNTIED.format(a="", b="(R*)", loss="crossentropy"), ["bp"] * 4 + ["fa-updated"]),
]


@pytest.mark.parametrize("spec,rules", TABLE_ROWS)
def test_report_specs_build_with_right_sizes_rules_and_loss(spec, rules):
    torch.manual_seed(0)
    net, loss = asymlib.build(spec)
    assert rules_of(net) == rules
    assert isinstance(loss, asymlib.HingeLoss if "hingeloss" in spec else nn.CrossEntropyLoss)
    if spec.startswith("Input - dense512 - dense256"):
        assert widths(net) == [(3072, 512), (512, 256), (256, 10)]
    elif spec.startswith("Input - dense512 - dense512"):
        assert widths(net) == [(3072, 512), (512, 512), (512, 256), (256, 256), (256, 10)]
    elif "Untied" in spec:
        # padded by 2 before every untied conv: 32 -> 16 -> 8 -> 8 -> 4, so 64*4*4 into dense128
        assert widths(net) == [(3, 32), (32, 64), (64, 64), (1024, 128), (128, 10)]
        assert [m.output_size for m in net if isinstance(m, asymlib.LocallyConnected2d)] == [(32, 32), (16, 16), (8, 8)]
    else:
        assert widths(net) == [(3, 32), (32, 64), (64, 64), (256, 128), (128, 10)]
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_ds0_parameter_counts():
    net, _ = asymlib.build("Input - dense512 - dense256 - dense10")
    assert sum(p.numel() for p in net.parameters()) == 1_706_496
    net, _ = asymlib.build("Input - dense512 - dense256 - dense10", bias=True)
    assert sum(p.numel() for p in net.parameters()) == 1_707_274


def test_poggio_feeds_256_features_into_dense128():
    net, _ = asymlib.build("PG0: " + POGGIO.format(a="", b="", loss="crossentropy").replace("*", "\\*") + ".")
    dense128 = [m for m in net if isinstance(m, asymlib.Linear)][0]
    assert dense128.in_features == 256 and dense128.out_features == 128


def test_report_text_verbatim_with_missing_space_and_label():
    net, loss = asymlib.build("DSR2:Input - dense512 - dense256(R) - dense10(R) - softmax -crossentropy.")
    assert rules_of(net) == ["bp", "fa", "fa"]


def test_rule_options_marks_and_batch_norm():
    net, _ = asymlib.build(SHALLOW.format(a="", b="(R)", loss="crossentropy"), rule="usf",
                           rules={"R": "kp(0.01)"})
    assert rules_of(net) == ["usf", "usf", "kp"]
    net, _ = asymlib.build("Input - dense32(psf(0.25)) - dense10(brsf)", keep_last_bp=True, rule="fa")
    assert rules_of(net) == ["psf", "brsf"]
    net, _ = asymlib.build("Input - dense32 - dense16 - dense10", rule="fa", keep_last_bp=True)
    assert rules_of(net) == ["fa", "fa", "bp"]
    net, _ = asymlib.build(POGGIO.format(a="", b="", loss="crossentropy"), batch_norm=True)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net) == 3
    assert sum(isinstance(m, nn.BatchNorm1d) for m in net) == 1
    net, _ = asymlib.build("Input - Conv5*5*8/1(valid) - Conv3*3*8/2(p1) - dense10", conv_padding="same")
    assert [m.padding for m in net if isinstance(m, asymlib.Conv2d)] == [(0, 0), (1, 1)]


@pytest.mark.parametrize("spec,bad", [
    ("Input - dense512 - dens256 - dense10", "dens256"),
    ("Input - dense512 - dense10(Q)", "Q"),
    ("Input - Conv5*5/1 - dense10", "Conv5*5/1"),
    ("Input - dense10 - crossentropy - dense10", "loss must be the last"),
    ("Input - dense10((R)", "unbalanced"),
    ("Input - dense0 - dense10", "dense0"),
    ("Input - dense512 - dense256", "output shape (256,)"),
    ("", "non-empty"),
])
def test_malformed_spec_names_the_bad_token(spec, bad):
    with pytest.raises(ValueError, match=re.escape(bad)):
        asymlib.build(spec)


def test_hinge_loss_matches_the_report_codes_formula():
    torch.manual_seed(1)
    s, y = torch.randn(5, 10) * 2, torch.randint(0, 10, (5,))
    t = F.one_hot(y, 10).double()
    sd = s.double()
    expected = (t * (1 - sd).clamp(min=0) + (1 - t) / 9 * (1 + sd).clamp(min=0)).mean()
    assert asymlib.HingeLoss()(s.double(), y).item() == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(ValueError, match="accepted: crossentropy, hingeloss"):
        asymlib.get_loss("mse")


def test_batch_manhattan_uses_only_the_gradient_sign():
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    p.grad = torch.tensor([0.001, -50.0, 0.0, 2.0])
    opt = asymlib.BatchManhattan([p], lr=0.1)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9, 3.0, 0.4]))
    q = nn.Parameter(torch.zeros(2))
    opt = asymlib.BatchManhattan([q], lr=0.1, momentum=0.5)
    for _ in range(2):
        q.grad = torch.tensor([1.0, -1.0])
        opt.step()
    torch.testing.assert_close(q.detach(), torch.tensor([-0.25, 0.25]))  # -0.1, then -0.1 - 0.05
    with pytest.raises(ValueError, match="accepted: adam, sgd, nesterov, bm"):
        asymlib.make_optimizer("rmsprop", [q])
    assert isinstance(asymlib.make_optimizer("nesterov", [q]), torch.optim.SGD)


def test_clipping_touches_only_asymmetric_layers():
    torch.manual_seed(2)
    net, loss_fn = asymlib.build("Input - dense16 - dense8(R) - dense4(R*)", in_shape=(6,), num_classes=4)
    loss_fn(net(torch.randn(8, 6) * 100), torch.randint(0, 4, (8,))).backward()
    layers = [m for _, m in asymlib.feedback_layers(net)]
    bp_grad = layers[0].weight.grad.clone()
    assert asymlib.clip_asymmetric_grads(net, 0.1) == 3  # W of layer 2, W and B of layer 3
    assert torch.equal(layers[0].weight.grad, bp_grad) and bp_grad.abs().max() > 0.1
    for m in layers[1:]:
        assert m.weight.grad.abs().max() <= 0.1
    with pytest.raises(ValueError, match="clip must be > 0"):
        asymlib.clip_asymmetric_grads(net, 0)


def test_alignment_metrics():
    torch.manual_seed(3)
    net, loss_fn = asymlib.build("Input - dense16 - dense8(usf) - dense4(R)", in_shape=(6,), num_classes=4)
    x, y = torch.randn(10, 6), torch.randint(0, 4, (10,))
    m = asymlib.alignment(net, loss_fn, x, y)
    first, usf, fa = m.values()
    assert first["angle_BW"] == pytest.approx(0, abs=1e-3) and first["norm_ratio"] == pytest.approx(1)
    assert usf["sign_concordance"] == 1.0 and usf["angle_BW"] < 90
    assert 60 < fa["angle_BW"] < 120 and 0.3 < fa["sign_concordance"] < 0.7
    assert fa["angle_delta"] == pytest.approx(0, abs=1e-3)      # the output layer's G is exact
    assert first["angle_delta"] > 1                              # below a random B it is not
    bp_net, loss_fn = asymlib.build("Input - dense16 - dense8 - dense4", in_shape=(6,), num_classes=4)
    assert all(v["angle_delta"] == pytest.approx(0, abs=1e-3) for v in asymlib.alignment(bp_net, loss_fn, x, y).values())
    assert math.isclose(asymlib.angle(torch.tensor([1.0, 0]), torch.tensor([0, 2.0])), 90)
    assert math.isnan(asymlib.angle(torch.ones(2), torch.ones(3)))


@pytest.mark.parametrize("kind", ["Conv", "Untied"])
@pytest.mark.parametrize("rule,batch_norm,bf16", [("bp", False, False), ("fa", True, False), ("dfa", False, False),
                                                  ("bp", False, True), ("usf", False, True)])
def test_max_pool_before_relu_gives_the_same_numbers_as_relu_before_max_pool(kind, rule, batch_norm, bf16):
    # build() puts a max pool before the ReLU it follows (they commute); the report's order, ReLU then
    # pool, must give bitwise the same outputs and gradients, ties and all-negative windows included
    spec = f"Input - {kind}3*3*6/1 - Maxpool3*3/2 - {kind}3*3*6/1 - Avgpool3*3/2 - dense16 - dense10"
    torch.manual_seed(0)
    net, loss_fn = asymlib.build(spec, (3, 12, 12), rule=rule, batch_norm=batch_norm)
    kinds = [type(m).__name__ for m in net]
    i = kinds.index("MaxPool2d")
    assert kinds[i + 1] == "ReLU" and kinds[i - 1] == ("BatchNorm2d" if batch_norm else "Conv2d" if kind == "Conv"
                                                       else "LocallyConnected2d")
    report_order = copy.deepcopy(net)
    mods = list(report_order)
    mods[i], mods[i + 1] = mods[i + 1], mods[i]
    report_order = asymlib.builder.FeedbackNet(*mods)
    x = torch.randn(16, 3, 12, 12).round()          # integer inputs: many exact ties in the pools
    y = torch.randint(0, 10, (16,))
    grads = []
    for m in (net, report_order):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = m(x)
            loss = loss_fn(out, y)
        loss.backward()
        grads.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    (a, ga), (b, gb) = grads
    assert torch.equal(a, b)
    assert len(ga) == len(gb) and all(torch.equal(u, v) for u, v in zip(ga, gb))
