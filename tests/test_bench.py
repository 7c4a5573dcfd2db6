"""The benchmark runs end to end (correctness only: timings are printed, never asserted)."""
import re

from asymlib import bench


def test_bench_prints_every_rule_with_its_ratios_and_fraction_of_peak(capsys):
    bench.main(["--nets", "ds0", "untied", "--precisions", "fp32", "--steps", "1", "--batch", "4",
                "--rules", "bp", "fa", "kp"])
    out = capsys.readouterr().out
    assert re.search(r"matmul peak \(2048\^3\) fp32 \d+ GFLOPS", out)
    for net, prec in [("ds0", "fp32"), ("untied", "fp32")]:
        assert f"{net}, {prec}, on cpu" in out
    lines = {l.split()[0]: l.split() for l in out.splitlines() if l and l.split()[0] in ("torch", "bp", "kp")}
    assert set(lines) == {"torch", "bp", "kp"}
    assert float(lines["bp"][3]) == 1.0           # the rule's step over bp's
    assert lines["kp"][-1].endswith("%")          # fraction of the precision's peak
    assert "tied bp/ch-last" in out and "bp/ch-last" in out   # the conv nets in channels-last too


def test_each_variant_is_credited_with_its_own_flops():
    """The untied net has more multiply-adds than the tied one it is compared with (its third conv keeps
    8x8 positions, the tied one 4x4): each row's GFLOPS is its own model's count over its own step."""
    import torch
    from asymlib.builder import build
    rows = {r["variant"]: r for r in bench.bench("untied", ["bp"], batch=2, steps=1, warmup=0)}
    x = torch.randn(2, 3, 32, 32)
    tied, untied = (bench.step_flops(build(bench.NETS[n], (3, 32, 32))[0], x) for n in ("poggio", "untied"))
    assert untied > 1.2 * tied
    for name, count in (("tied bp", tied), ("bp", untied), ("tied bp/ch-last", tied), ("bp/ch-last", untied)):
        r = rows[name]
        assert abs(r["gflops"] * r["step_ms"] / 1e3 * 1e9 / count - 1) < 1e-9, name
