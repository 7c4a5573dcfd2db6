"""The benchmark runs end to end (correctness only: timings are printed, never asserted)."""
import re

from asymlib import bench


def test_bench_prints_every_rule_with_its_ratios_and_fraction_of_peak(capsys):
    bench.main(["--nets", "ds0", "untied", "--precisions", "fp32", "--steps", "1", "--batch", "4",
                "--rules", "bp", "fa", "kp"])
    out = capsys.readouterr().out
    assert re.search(r"matmul peak \(2048\^3\) fp32 \d+ GFLOPS", out)
    assert re.search(r"^CPU: .+, features .+, torch kernels \w+$", out, re.M)
    for net, prec in [("ds0", "fp32"), ("untied", "fp32")]:
        assert f"{net}, {prec}, on cpu" in out
    lines = {l.split()[0]: l.split() for l in out.splitlines() if l and l.split()[0] in ("torch", "bp", "kp")}
    assert set(lines) == {"torch", "bp", "kp"}
    assert float(lines["bp"][3]) == 1.0 and lines["bp"][4] == "1.000-1.000"   # the rule's step over bp's, its CI
    lo, hi = map(float, lines["kp"][4].split("-"))
    assert lo <= float(lines["kp"][3]) <= hi
    assert lines["kp"][-1].endswith("%")          # fraction of the precision's peak
    assert "tied bp/ch-last" in out and "bp/ch-last" in out   # the conv nets in channels-last too
    assert "opt ms" in out and float(lines["kp"][8]) > 0       # the optimizer step's own time (kp's also updates B)
    # the untied step over each layout of the tied one (issue 14's item 4), both untied layouts
    ratios = re.findall(r"^  untied (bp|bp/ch-last) ÷ (.+)$", out, re.M)
    assert [u for u, _ in ratios] == ["bp", "bp/ch-last"]
    for _, line in ratios:
        assert re.fullmatch(r"tied bp \d+\.\d\dx, tied bp/same pad \d+\.\d\dx, tied bp/ch-last \d+\.\d\dx, "
                            r"tied bp/same pad/ch-last \d+\.\d\dx", line), line


def test_paired_ratio_is_the_median_of_same_round_ratios_with_an_order_statistic_interval():
    """A drift that slows both variants of a round alike cancels in the paired ratios (the ratio of
    medians would not see through it), and the interval holds the median between two order statistics."""
    import random
    random.seed(0)
    load = [1 + 2 * (i % 5) for i in range(40)]                      # the machine 1x..9x slower by turns
    base = [0.010 * l * random.uniform(0.99, 1.01) for l in load]
    rule = [0.012 * l * random.uniform(0.99, 1.01) for l in load]     # truly 1.2x
    med, lo, hi = bench.paired_ratio(rule, base)
    assert 1.19 < lo <= med <= hi < 1.21
    r = sorted(t / b for t, b in zip(rule, base))
    assert (lo, hi) == (r[13], r[26])            # n = 40: ranks 20 -+ 1.96 sqrt(40)/2 = 14 and 27 (1-based)
    assert bench.paired_ratio([2.0], [1.0]) == (2.0, 2.0, 2.0)


def test_each_variant_is_credited_with_its_own_flops():
    """The untied net has more multiply-adds than the tied one it is compared with (its third conv keeps
    8x8 positions, the tied one 4x4): each row's GFLOPS is its own model's count over its own step."""
    import torch
    from asymlib.builder import build
    rows = {r["variant"]: r for r in bench.bench("untied", ["bp"], batch=2, steps=1, warmup=0)}
    x = torch.randn(2, 3, 32, 32)
    tied, untied = (bench.step_flops(build(bench.NETS[n], (3, 32, 32))[0], x) for n in ("poggio", "untied"))
    assert untied > 1.2 * tied
    same = bench.step_flops(build(bench.NETS["poggio"], (3, 32, 32), conv_padding="same")[0], x)
    assert same == untied      # the tied reference with the untied net's output sizes: the same multiply-adds
    for name, count in (("tied bp", tied), ("bp", untied), ("tied bp/ch-last", tied), ("bp/ch-last", untied),
                        ("tied bp/same pad", same), ("tied bp/same pad/ch-last", same)):
        r = rows[name]
        assert abs(r["gflops"] * r["step_ms"] / 1e3 * 1e9 / count - 1) < 1e-9, name


def test_since_times_an_old_commits_code_against_todays(capsys):
    """``--since REF`` runs Poggio's net with the asymlib of commit REF (extracted with git archive) and
    with today's, each in its own process: every row reports, the first is the speedup's reference."""
    import subprocess
    import pytest
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=bench.Path(bench.__file__).parent).stdout.strip()
    except (FileNotFoundError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    rows = bench.speedup_since(head, batch=2, steps=1, rounds=1)
    names = [r["variant"] for r in rows]
    assert names[0] == f"{head} fp32 NCHW, as it ran (system malloc)" and rows[0]["speedup"] == 1.0
    assert names[-1].startswith("now bf16 channels-last")
    assert all(r["step_ms"] > 0 and r["steps"] == 1 for r in rows)


def test_since_a_commit_that_does_not_exist_says_what_to_give():
    import pytest
    with pytest.raises(SystemExit, match=r"--since 'no-such-commit'.*give a commit of this repository"):
        bench.package_at("no-such-commit", bench.Path("/nonexistent"))


def test_pfa_is_credited_with_its_own_products():
    """pfa's multiply-adds against bp's: its P^T dW in every layer and B = P R where the input gradient
    is needed, on top of bp's three products (the bench prints the ratio beside the step's)."""
    import torch
    from asymlib.builder import build
    x = torch.randn(4, 3, 32, 32)
    net = build(bench.NETS["ds0"], (3, 32, 32), rule="pfa(2)")[0]
    layers = [m for m in net if hasattr(m, "feedback_fixed")]
    extra = sum(2 * m.feedback_fixed.numel() * m.feedback_learned.shape[1] * (1 if i == 0 else 2)
                for i, m in enumerate(layers))
    assert bench.step_flops(net, x, rule_products=True) == bench.step_flops(net, x) + extra
    bp = build(bench.NETS["ds0"], (3, 32, 32), rule="bp")[0]
    assert bench.step_flops(bp, x, rule_products=True) == bench.step_flops(bp, x)
    rows = {r["variant"]: r for r in bench.bench("ds0", ["bp", "pfa(2)"], batch=4, steps=1, warmup=0)}
    assert rows["bp"]["multiply_add_ratio"] == 1 and rows["pfa(2)"]["multiply_add_ratio"] > 1.5


def test_bench_says_when_bf16_is_the_slower_precision(capsys, monkeypatch):
    """(a CPU without AMX units in use): said under the peaks, with the ratio; nothing where bf16 is faster."""
    for bf16_peak, said in [(50.0, True), (400.0, False)]:
        monkeypatch.setattr(bench, "matmul_peak", lambda dev, dtype: 100.0 if dtype == bench.torch.float32 else bf16_peak)
        bench.main(["--nets", "ds0", "--precisions", "fp32", "bf16", "--steps", "1", "--batch", "4", "--rules", "bp"])
        out = capsys.readouterr().out
        assert ("bf16 runs at 0.50x fp32 here: no AMX units in use" in out) == said
