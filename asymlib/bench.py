"""Training-step time of every rule against plain torch backprop, and how close to the machine's limit.

    python -m asymlib.bench [--nets ds0 dd poggio untied] [--precisions fp32 bf16] [--batch 500] [--steps 20]
    python -m asymlib.bench --since REF     # Poggio's net now against the code of git commit REF

First the machine's matmul peak per precision (a 2048^3 product). Then for each network and
precision, a plain torch model (``nn.Linear``/``nn.Conv2d``, same sizes, no biases) and one asymlib
model per rule are timed step by step in interleaved rounds (so drifts in machine load hit all alike):
the median step time (forward + backward + Adam step), its ratio to plain torch and to asymlib's ``bp``
(a rule's overhead; each ratio the median of the ratios of steps timed in the same round, and for
``÷ bp`` its 95% confidence interval, :func:`paired_ratio`: on a machine whose speed drifts, a ratio
whose interval spans 1.05 says neither over nor under it), the achieved GFLOPS (backprop's FLOPs in the weight layers, :func:`step_flops`:
forward, weight gradient and input gradient, the first layer's input gradient excluded) and that as a
fraction of the precision's peak. The conv nets' bp is timed a second time in channels-last memory
(``/ch-last``). The untied net (no torch twin) is compared with the tied net's ``bp`` step at the same
precision, twice: the book's tied net (third conv ``valid``, 4x4) and the same net with every conv
``same`` (``tied bp/same pad``: the untied net's output sizes, so the same multiply-adds).

``--since REF`` answers "how much faster than the code at commit REF": Poggio's net's ``bp`` step with
the ``asymlib`` of REF (``git archive``) in fp32 NCHW, as it then ran (system malloc) and under
today's process settings, against today's code in fp32 and in bf16 channels-last; each variant in
its own fresh process, in interleaved rounds.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from .builder import build
from .malloc import allocator_in_use
from .layers import Conv2d, Linear
from .rules import ErrorTap
from .store import cpu_description
from .optim import make_optimizer

_POGGIO = ("Input - Conv5*5*32/1 - Maxpool3*3/2 - Conv5*5*64/1 - Avgpool3*3/2 - Conv5*5*64/1 - "
           "Avgpool3*3/2 - dense128 - dense10")
NETS = {
    "ds0": "Input - dense512 - dense256 - dense10",
    "dd": "Input - dense512 - dense512 - dense256 - dense256 - dense10",
    "poggio": _POGGIO,
    "untied": _POGGIO.replace("Conv", "Untied"),
}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BENCH_RULES = ["bp", "fa", "fa-updated", "kp", "usf", "brsf", "frsf", "psf(0.5)", "dfa", "pfa(2)"]


def plain_torch(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every feedback layer replaced by its torch twin (same weights)."""
    mods = []
    for m in model:
        if isinstance(m, Linear):
            t = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        elif isinstance(m, Conv2d):
            t = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                          bias=m.bias is not None)
        elif isinstance(m, ErrorTap):  # DFA's output tap: identity forward
            continue
        else:
            mods.append(m)
            continue
        with torch.no_grad():
            t.weight.copy_(m.weight)
        mods.append(t)
    return nn.Sequential(*mods)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10,
                min_seconds: float = 1.0) -> float:
    """GFLOPS of an n^3 matrix product in ``dtype``: the best of at least ``reps`` products and at least
    ``min_seconds`` of them (one short burst read bf16's peak anywhere from 0.8 to 1.9 TFLOPS here)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    best, start, done = float("inf"), time.perf_counter(), 0
    while done < reps or time.perf_counter() - start < min_seconds:
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best, done = min(best, time.perf_counter() - t0), done + 1
    return 2 * n ** 3 / best / 1e9


def step_flops(model: nn.Module, x: torch.Tensor, rule_products: bool = False) -> int:
    """FLOPs of backprop's training step in the weight layers: per layer 2 x its forward multiply-adds
    for the forward, the weight gradient and the input gradient -- the last skipped for a layer whose
    input needs no gradient (the first), as autograd and asymlib skip it. Every rule is timed against
    this same count (bp-equivalent FLOPs). ``rule_products=True`` adds the products a rule does on top
    (pfa: P^T dW in every layer, and B = P R where the input gradient is needed)."""
    from .layers import FeedbackLayer
    from .rules import ProductFeedback
    flops, hooks = [0], []

    def hook(m, inp, out):
        per_output = m.weight[0].numel() if not hasattr(m, "output_size") else m.weight.shape[2]
        passes = 3 if inp[0].requires_grad else 2
        flops[0] += 2 * passes * out.numel() * per_output
        if rule_products and isinstance(getattr(m, "rule", None), ProductFeedback):
            product = 2 * m.feedback_fixed.numel() * m.feedback_learned.shape[1]    # out x n_mid x rest
            flops[0] += product * (2 if inp[0].requires_grad else 1)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, FeedbackLayer)):
            hooks.append(m.register_forward_hook(hook))
    model(x)   # with autograd on, so that requires_grad tells which inputs need a gradient
    for h in hooks:
        h.remove()
    return flops[0]


def time_step(model, loss_fn, opt, x, y, device, dtype=None) -> tuple[float, float, float]:
    """(seconds for forward+backward+step, for the backward alone, for the optimizer step alone)."""
    _sync(device)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        loss = loss_fn(model(x), y)
    _sync(device)
    t1 = time.perf_counter()
    loss.backward()
    _sync(device)
    t2 = time.perf_counter()
    opt.step()
    _sync(device)
    t3 = time.perf_counter()
    return t3 - t0, t2 - t1, t3 - t2


def paired_ratio(times: list[float], base: list[float]) -> tuple[float, float, float]:
    """The median of the step-by-step ratios ``times[i] / base[i]`` (both timed in the same interleaved
    round, so a drift in the machine's load hits both) and its 95% confidence interval: the j-th smallest
    and the j-th largest ratio, j the largest rank with P(Binomial(n, 1/2) < j) <= 2.5% (distribution-free:
    the true median lies between them with at least 95% probability whatever the ratios' distribution;
    about n/2 -+ sqrt(n); with 5 steps or fewer no pair reaches 95%, and the whole range is given).
    (median, low, high)."""
    r = sorted(t / b for t, b in zip(times, base))
    n, j, below = len(r), 1, 1                     # below = C(n, 0) + ... + C(n, j-1)
    while 40 * (below + math.comb(n, j)) <= 2 ** n:
        below += math.comb(n, j)
        j += 1
    return statistics.median(r), r[j - 1], r[n - j]


def bench(net: str, rules=BENCH_RULES, batch: int = 500, steps: int = 20, warmup: int = 3,
          device: str = "cpu", seed: int = 0, precision: str = "fp32") -> list[dict]:
    dev, dtype = torch.device(device), PRECISIONS[precision]
    torch.manual_seed(seed)
    in_shape = (3, 32, 32)
    x = torch.randn(batch, *in_shape, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    variants = {}
    for rule in rules:
        model, loss_fn = build(NETS[net], in_shape, rule=rule)
        variants[rule] = model.to(dev)
    if net != "untied":
        variants = {"torch": plain_torch(variants["bp"]).to(dev), **variants}
    else:   # no torch twin: the tied net's bp step is the reference
        variants = {"tied bp": build(NETS["poggio"], in_shape, rule="bp")[0].to(dev),
                    "tied bp/same pad": build(NETS["poggio"], in_shape, rule="bp", conv_padding="same")[0].to(dev),
                    **variants}
    inputs = {k: x for k in variants}
    if net in ("poggio", "untied"):   # the conv nets again in channels-last memory (Config.channels_last)
        cl = torch.channels_last
        for k in ("tied bp", "tied bp/same pad", "torch", "bp"):
            if k in variants:   # a copy of the same model (same weights), its conv kernels channels-last
                variants[k + "/ch-last"] = copy.deepcopy(variants[k]).to(dev, memory_format=cl)
                inputs[k + "/ch-last"] = x.contiguous(memory_format=cl)
    # each model's own count: the tied net of the untied comparison has fewer multiply-adds (its third
    # conv is 'valid', 4x4, the untied one 'same', 8x8), so it must not be credited with the untied net's
    flops = {k: step_flops(m, inputs[k]) for k, m in variants.items()}
    own = {k: step_flops(m, inputs[k], rule_products=True) for k, m in variants.items()}
    opts = {k: make_optimizer("adam", m.parameters()) for k, m in variants.items()}
    loss_fn = nn.CrossEntropyLoss()
    times = {k: [] for k in variants}
    for i in range(warmup + steps):
        for k, m in variants.items():
            t = time_step(m, loss_fn, opts[k], inputs[k], y, dev, dtype)
            if i >= warmup:
                times[k].append(t)
    ref = next(iter(variants))
    column = lambda k, i: [t[i] for t in times[k]]
    rows = []
    for k, ts in times.items():
        step, bwd, upd = (statistics.median(t[i] for t in ts) for i in range(3))
        # ratios of steps timed in the same round (paired), not of medians: the machine's drift cancels
        rows.append(dict(net=net, precision=precision, variant=k, step_ms=1e3 * step, backward_ms=1e3 * bwd,
                         optimizer_ms=1e3 * upd, step_s=column(k, 0),
                         step_ratio=paired_ratio(column(k, 0), column(ref, 0))[0],
                         backward_ratio=paired_ratio(column(k, 1), column(ref, 1))[0], reference=ref,
                         bp_ratio=paired_ratio(column(k, 0), column("bp", 0)) if "bp" in times else None,
                         gflops=flops[k] / step / 1e9, multiply_add_ratio=own[k] / flops[k]))
    return rows


#: Poggio's net's bp training step, timed in a fresh process with whichever ``asymlib`` is first on its
#: path (today's or an old commit's): it uses only ``build`` and ``make_optimizer``, which every version has
_STEP_SCRIPT = r"""
import json, sys, time
import asymlib, torch
from asymlib.builder import build
from asymlib.optim import make_optimizer
spec, precision, layout, batch, steps, threads, expect = json.loads(sys.argv[1])
if not asymlib.__file__.startswith(expect):
    sys.exit(f"imported asymlib from {asymlib.__file__}, expected the one under {expect}")
torch.set_num_threads(threads)
torch.manual_seed(0)
net = build(spec, (3, 32, 32), rule="bp")
net = net[0] if isinstance(net, tuple) else net
x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
if layout == "channels-last":
    net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
opt, loss_fn, times = make_optimizer("adam", net.parameters()), torch.nn.CrossEntropyLoss(), []
for i in range(3 + steps):
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = loss_fn(net(x), y)
    loss.backward()
    opt.step()
    if i >= 3:
        times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def package_at(ref: str, dest: Path) -> Path:
    """Extract the ``asymlib`` package of git commit ``ref`` of this checkout into ``dest``; returns ``dest``."""
    import io
    import tarfile
    repo = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(repo), "archive", ref, "asymlib"], capture_output=True, check=True)
    except FileNotFoundError:
        raise SystemExit("--since needs git on the PATH and asymlib run from a git checkout") from None
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"--since {ref!r}: `git archive` in {repo} failed ({e.stderr.decode().strip()}); give a "
                         f"commit of this repository that has asymlib/, e.g. e6e5f1f (the code when issue 14 "
                         f"measured the fp32 step)") from None
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tar:
        tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return dest


def speedup_since(ref: str, batch: int = 500, steps: int = 10, rounds: int = 3,
                  threads: int | None = None) -> list[dict]:
    """Poggio's net's bp step (Adam, CPU) with the code of commit ``ref`` against today's, each variant in
    a fresh process, in ``rounds`` interleaved rounds of ``steps`` timed steps (after 3 warm-up steps).

    Rows: ``ref`` in fp32 NCHW as it ran then (system malloc, none of the process settings asymlib
    adds today) and under today's settings (the caching allocator, transparent huge pages); today's
    code in fp32 NCHW, fp32 channels-last and bf16 channels-last. ``speedup`` is
    the first row's median step over the row's."""
    threads = threads or torch.get_num_threads()
    here = Path(__file__).resolve().parent.parent
    # the process settings asymlib adds today (the allocator restart, transparent huge pages), undone for
    # the code of REF as it ran then, and kept for the same code under today's settings
    import asymlib
    now = dict(os.environ)
    then = {k: v for k, v in now.items() if k != "LD_PRELOAD"
            and not (k == "THP_MEM_ALLOC_ENABLE" and asymlib._THP_SET_HERE)} | {"ASYMLIB_MALLOC": "system"}
    settings = allocator_in_use() + (", THP" if now.get("THP_MEM_ALLOC_ENABLE") == "1" else "")
    with tempfile.TemporaryDirectory() as tmp:
        old = package_at(ref, Path(tmp))
        variants = [(f"{ref} fp32 NCHW, as it ran (system malloc)", old, "fp32", "NCHW", then),
                    (f"{ref} fp32 NCHW, today's {settings}", old, "fp32", "NCHW", now),
                    (f"now fp32 NCHW, {settings}", here, "fp32", "NCHW", now),
                    (f"now fp32 channels-last, {settings}", here, "fp32", "channels-last", now),
                    (f"now bf16 channels-last, {settings}", here, "bf16", "channels-last", now)]
        times = {v[0]: [] for v in variants}
        for _ in range(rounds):
            for name, root, precision, layout, env in variants:
                args = json.dumps([NETS["poggio"], precision, layout, batch, steps, threads, str(root / "asymlib")])
                env = env | {"PYTHONPATH": os.pathsep.join(filter(None, (str(root), env.get("PYTHONPATH"))))}
                run = subprocess.run([sys.executable, "-c", _STEP_SCRIPT, args], env=env, cwd=root, capture_output=True,
                                     text=True)
                if run.returncode != 0:
                    raise RuntimeError(f"--since: timing {name!r} failed:\n{run.stderr[-2000:]}")
                times[name] += json.loads(run.stdout.strip().splitlines()[-1])
    base = statistics.median(times[variants[0][0]])
    return [dict(variant=k, step_ms=1e3 * statistics.median(ts), speedup=base / statistics.median(ts),
                 steps=len(ts)) for k, ts in times.items()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m asymlib.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    ap.add_argument("--rules", nargs="+", default=BENCH_RULES)
    ap.add_argument("--precisions", nargs="+", default=None, choices=list(PRECISIONS),
                    help="default: fp32 and bf16 (and fp16 on CUDA)")
    ap.add_argument("--batch", type=int, default=500, help="batch size (the report's: 500)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (both when CUDA is present)")
    ap.add_argument("--since", metavar="REF", help="only Poggio's net's step, today's code against git commit "
                    "REF's (CPU): e.g. e6e5f1f, the code issue 14's fp32 step was measured on")
    a = ap.parse_args(argv)
    if a.since:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch {a.batch}, Poggio's net bp "
              f"with Adam, median of {3 * a.steps} steps (3 interleaved rounds, a fresh process each)")
        print(f"{'variant':<54}{'step ms':>10}{'speedup':>9}")
        for r in speedup_since(a.since, a.batch, a.steps):
            print(f"{r['variant']:<54}{r['step_ms']:>10.1f}{r['speedup']:>8.2f}x")
        return
    devices = ["cpu", "cuda"] if a.device == "auto" and torch.cuda.is_available() else \
        ["cpu" if a.device == "auto" else a.device]
    rules = a.rules if "bp" in a.rules else ["bp", *a.rules]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, malloc {allocator_in_use()}, batch {a.batch}, "
          f"median of {a.steps} "
          f"steps; ratios to plain torch (nn.Linear/nn.Conv2d) in the same run, the untied net's to the tied bp step: "
          f"medians of the ratios of steps timed in the same round, with the 95% confidence interval of ÷ bp")
    cpu = cpu_description()
    print(f"CPU: {cpu['model']}, features {', '.join(cpu['features']) or 'unknown'}, torch kernels {cpu['torch_capability']}")
    for device in devices:
        dev = torch.device(device)
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        precisions = a.precisions or (["fp32", "bf16", "fp16"] if device == "cuda" else ["fp32", "bf16"])
        peaks = {p: matmul_peak(dev, PRECISIONS[p] or torch.float32) for p in precisions}
        print(f"\n{name}: matmul peak (2048^3) " + ", ".join(f"{p} {g:.0f} GFLOPS" for p, g in peaks.items()))
        if device == "cpu" and peaks.get("bf16", math.inf) < peaks.get("fp32", 0):
            print(f"  bf16 runs at {peaks['bf16'] / peaks['fp32']:.2f}x fp32 here: no AMX units in use "
                  f"({'amx_bf16 listed, not in use' if 'amx_bf16' in cpu['features'] else 'the CPU lists no amx_bf16'}); "
                  f"bf16 autocast is the slower precision on this machine")
        for net in a.nets:
            for prec in precisions:
                print(f"\n{net}, {prec}, on {name}")
                print(f"{'variant':<26}{'step ms':>10}{'ratio':>8}{'÷ bp':>8}{'95% CI':>14}{'bwd ms':>10}{'ratio':>8}"
                      f"{'opt ms':>8}{'GFLOPS':>9}{'of peak':>9}")
                rows = bench(net, rules, a.batch, a.steps, device=device, precision=prec)
                bp = next(r["step_ms"] for r in rows if r["variant"] == "bp")
                for r in rows:
                    ratio, lo, hi = r["bp_ratio"]
                    print(f"{r['variant']:<26}{r['step_ms']:>10.1f}{r['step_ratio']:>8.3f}{ratio:>8.3f}"
                          f"{f'{lo:.3f}-{hi:.3f}':>14}"
                          f"{r['backward_ms']:>10.1f}{r['backward_ratio']:>8.3f}{r['optimizer_ms']:>8.1f}{r['gflops']:>9.1f}"
                          f"{r['gflops'] / peaks[prec]:>9.1%}")
                bp_opt = next(r["optimizer_ms"] for r in rows if r["variant"] == "bp")
                for r in rows:   # rules that also learn B: the optimizer's extra pass over it, a floor of their ratio
                    if r["optimizer_ms"] > 1.5 * bp_opt and r["variant"] != "bp":
                        print(f"  {r['variant']}: its optimizer step {r['optimizer_ms']:.1f} ms against bp's {bp_opt:.1f}: "
                              f"{(r['optimizer_ms'] - bp_opt) / bp:.1%} of bp's step for updating B alone")
                if net == "untied":   # issue 14's item 4: the untied step against each layout of the tied one
                    tied = [r for r in rows if r["variant"].startswith("tied")]
                    for u in (r for r in rows if r["variant"] in ("bp", "bp/ch-last")):
                        print(f"  untied {u['variant']} ÷ " + ", ".join(
                            f"{t['variant']} {paired_ratio(u['step_s'], t['step_s'])[0]:.2f}x" for t in tied))
                for r in rows:   # rules with products of their own (pfa): their multiply-adds against bp's
                    if r["multiply_add_ratio"] != 1:
                        print(f"  {r['variant']}: {r['multiply_add_ratio']:.2f}x bp's multiply-adds, "
                              f"step {r['bp_ratio'][0]:.2f}x bp's")


if __name__ == "__main__":
    main()
