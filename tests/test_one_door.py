"""One door for rules and one for profiles: build, convert and the named models resolve rule choices
through one function; Config, the command line, the tables and the book read one profile registry."""
import pytest
import torch
from torch import nn

import asymlib
import asymlib.rules as rules_mod
from asymlib import build, convert, layers
from asymlib.cli import main as cli
from asymlib.experiments import TABLE1, profile_config
from asymlib.profiles import CUSTOM, PROFILES
from asymlib.training import Config


def rule_signature(model):
    """Per feedback layer: the rule's class and repr, and which layers share one rule object."""
    fl = [l for _, l in layers.feedback_layers(model)]
    ids = [id(l.rule) for l in fl]
    return [(type(l.rule).__name__, repr(l.rule)) for l in fl], [ids.index(i) for i in ids]


@pytest.mark.parametrize("rule", ["psf(0.5)", "fa", "dfa", "kp(0.01)"])
@pytest.mark.parametrize("keep_last_bp", [False, True])
def test_build_and_convert_resolve_the_same_rules(rule, keep_last_bp):
    built, _ = build("Input - dense16 - dense16 - dense10", (8,), 10, rule=rule, keep_last_bp=keep_last_bp)
    torch_net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 10))
    converted = convert(torch_net, rule, keep_last_bp=keep_last_bp, example_input=torch.randn(2, 8))
    assert rule_signature(built) == rule_signature(converted)
    if rule == "dfa":   # one DirectFeedback object shared by the DFA layers, and its output tap
        kinds, shared = rule_signature(built)
        assert len(set(shared[: (2 if keep_last_bp else 3)])) == 1
        assert isinstance(list(built)[-1], asymlib.rules.ErrorTap) and isinstance(converted[-1], asymlib.rules.ErrorTap)


def test_build_convert_and_named_models_all_go_through_resolve_rules(monkeypatch):
    calls = []
    real = rules_mod.resolve_rules

    def spy(*a, **k):
        calls.append(k.get("keep_last_bp"))
        return real(*a, **k)
    import sys
    builder_mod, convert_mod = sys.modules["asymlib.builder"], sys.modules["asymlib.convert"]
    monkeypatch.setattr(builder_mod, "resolve_rules", spy)
    monkeypatch.setattr(convert_mod, "resolve_rules", spy)
    build("Input - dense16 - dense10(R)", (8,), 10, rule="usf")
    convert(nn.Sequential(nn.Linear(8, 10)), "usf")
    build("plain2x8", (3, 8, 8), 10, rule="fa", keep_last_bp=True)   # a named model: convert inside
    assert calls == [False, False, True]


def test_marks_win_over_the_network_rule_and_keep_last_bp():
    net, _ = build("Input - dense16(usf) - dense16 - dense10(R)", (8,), 10, rule="fa", keep_last_bp=True,
                   rules={"R": "frsf"})
    assert [l.rule.name for _, l in layers.feedback_layers(net)] == ["usf", "fa", "frsf"]


def test_one_profile_registry_for_config_cli_tables_and_book(capsys):
    assert set(PROFILES) == {"quick", "cpu", "full"}
    for p in (*PROFILES, CUSTOM):
        Config(spec="Input - dense10", dataset="digits", profile=p)
    with pytest.raises(ValueError, match="quick, cpu, full, custom"):
        Config(spec="Input - dense10", dataset="digits", profile="fast")
    quick = profile_config(TABLE1.configs("full")[0], "quick")
    assert (quick.train_subset, quick.test_subset, quick.batch_size) == (
        PROFILES["quick"].train_subset, PROFILES["quick"].test_subset, PROFILES["quick"].batch_size)
    assert TABLE1.configs("cpu")[0].train_subset is None
    with pytest.raises(SystemExit):
        cli(["table", "table1", "--profile", "fast"])
    err = capsys.readouterr().err
    assert "choose from 'quick', 'cpu', 'full'" in err
    from asymlib import book
    assert book.PROFILES == tuple(PROFILES)
    ch = book.Chapter("quick")
    ch.profiles["table1"] = "quick"
    assert PROFILES["quick"].purpose in ch.banner()
