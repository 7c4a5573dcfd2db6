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
