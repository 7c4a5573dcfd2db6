"""Bring-your-own-model converter and the deep nets of the scaling chapters."""
import pytest
import torch
from torch import nn

from asymlib import layers
from asymlib.convert import convert
from asymlib.models import ResNet, alexnet, plain_convnet, resnet
from asymlib.rules import DirectFeedback, ErrorTap


def torch_layers(model):
    return [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


def small_torch_resnet():
    torch.manual_seed(0)
    return ResNet((1, 1), (8, 16), num_classes=5).double()   # plain torch.nn: stem, 2 blocks, projection


def test_convert_swaps_every_conv_and_linear_and_keeps_the_rest():
    net = small_torch_resnet()
    names = torch_layers(net)
    assert len(names) == 1 + 2 * 2 + 1 + 1          # stem, 2 blocks x 2 convs, 1 projection, fc
    conv = convert(net, "fa")
    assert torch_layers(conv) == [] and torch_layers(net) == names     # the original is untouched
    swapped = dict(layers.feedback_layers(conv))
    assert sorted(swapped) == sorted(names)
    assert all(l.rule.name == "fa" for l in swapped.values())
    n_bn = lambda m: sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    assert n_bn(conv) == n_bn(net) == 6
    for name, l in swapped.items():                 # W and b copied
        assert torch.equal(l.weight, net.get_submodule(name).weight)


def test_converted_with_bp_gives_the_original_outputs_and_gradients():
    net = small_torch_resnet()
    conv = convert(net, "bp")
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    grads = []
    for m in (net, conv):
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        nn.functional.cross_entropy(out, y).backward()
        grads.append((out.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    (o1, gx1, g1), (o2, gx2, g2) = grads
    assert torch.allclose(o1, o2, atol=1e-12) and torch.allclose(gx1, gx2, atol=1e-12)
    assert g1.keys() == g2.keys() and len(g1) > 10
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-12), n


def test_torchvision_resnet18_converts_with_identical_gradients(torchvision):
    tv = torchvision
    torch.manual_seed(0)
    net = tv.models.resnet18(num_classes=10).double()
    conv = convert(net, "bp")
    assert torch_layers(conv) == [] and len(dict(layers.feedback_layers(conv))) == len(torch_layers(net)) == 21
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for m in (net, conv):
        m.zero_grad()
        m(x).square().sum().backward()
    for (n, p), (_, q) in zip(net.named_parameters(), conv.named_parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-9), n


def test_keep_last_bp_rule_functions_and_errors():
    net = small_torch_resnet()
    conv = dict(layers.feedback_layers(convert(net, "usf", keep_last_bp=True)))
    assert conv["fc"].rule.name == "bp" and conv["stem.0"].rule.name == "usf"
    per_layer = dict(layers.feedback_layers(convert(net, lambda name, m: "fa" if isinstance(m, nn.Linear) else "frsf")))
    assert per_layer["fc"].rule.name == "fa" and per_layer["blocks.0.conv1"].rule.name == "frsf"
    with pytest.raises(ValueError, match="groups=2"):
        convert(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), "fa")
    with pytest.raises(ValueError, match="needs example_input"):
        convert(net, "dfa")
    with pytest.raises(ValueError, match="unknown feedback rule 'nope'"):
        convert(net, "nope")
    with pytest.raises(ValueError, match="no nn.Conv2d or nn.Linear"):
        convert(nn.Sequential(nn.ReLU()), "fa")


def test_dfa_in_a_converted_resnet_uses_one_rule_and_the_output_error():
    torch.manual_seed(0)
    net = resnet(20, num_classes=10, rule="dfa", width=4)
    assert isinstance(net, nn.Sequential) and isinstance(net[-1], ErrorTap)
    rules = {id(l.rule) for _, l in layers.feedback_layers(net)}
    assert len(rules) == 1 and isinstance(net[-1].rule, DirectFeedback)
    x = torch.randn(3, 3, 32, 32)
    out = net(x)
    nn.functional.cross_entropy(out, torch.tensor([1, 2, 3])).backward()
    e = net[-1].rule.error
    assert e.shape == (3, 10)
    fc = net[0].fc
    # the classifier's input delta is e B (DFA), not e W
    assert not torch.allclose(fc.B, fc.weight.detach()) and fc.B.shape == (10, fc.in_features)


def test_model_shapes_and_sizes():
    x = torch.randn(2, 3, 32, 32)
    r18 = resnet(18, rule="usf", stem="imagenet")
    assert sum(p.numel() for p in r18.parameters()) == 11_181_642   # torchvision's resnet18(num_classes=10)
    assert r18(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    r20 = resnet(20, rule="fa")
    assert len(dict(layers.feedback_layers(r20))) == 19 + 2 + 1      # 19 convs, 2 projections, fc
    assert r20(x).shape == (2, 10)
    assert alexnet(rule="frsf", width=0.25)(x).shape == (2, 10)
    pc = plain_convnet(5, width=8, rule="fa", keep_last_bp=True)
    fl = dict(layers.feedback_layers(pc))
    assert len(fl) == 6 and list(fl.values())[-1].rule.name == "bp" and pc(x).shape == (2, 10)
    with pytest.raises(ValueError, match="6n\\+2"):
        resnet(19)


def test_named_models_build_and_train_through_the_engine(tmp_path):
    from asymlib import Config, build, train
    from asymlib.store import ResultStore
    net, loss = build("plain3x4", (1, 8, 8), 10, rule="usf", keep_last_bp=True)
    fl = list(layers.feedback_layers(net))
    assert len(fl) == 4 and fl[0][1].rule.name == "usf" and fl[-1][1].rule.name == "bp"
    assert isinstance(build("resnet20@4", (3, 32, 32), 10).model, ResNet)
    with pytest.raises(ValueError, match="square images"):
        build("resnet18", (64,), 10)
    run = train(Config(spec="plain2x4", dataset="digits", rule="fa", epochs=1, batch_size=64, device="cpu"),
                ResultStore(tmp_path), progress=False)
    assert run.status == "completed" and 0 <= run.final["test_acc"] <= 1
