"""Training-step time of every rule against plain torch backprop, measured in the same run.

    python -m asymlib.bench [--nets ds0 poggio] [--batch 500] [--steps 20] [--device auto]

For each network, a plain torch model (``nn.Linear``/``nn.Conv2d``, same sizes, no biases) and
one asymlib model per rule are timed step by step in interleaved rounds (so drifts in machine
load hit all alike); the table gives the median step time (forward + backward + Adam step), the
median backward time, and both as ratios to plain torch.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from .builder import build
from .layers import Conv2d, Linear
from .rules import ErrorTap
from .optim import make_optimizer

NETS = {
    "ds0": "Input - dense512 - dense256 - dense10",
    "poggio": ("Input - Conv5*5*32/1 - Maxpool3*3/2 - Conv5*5*64/1 - Avgpool3*3/2 - Conv5*5*64/1 - "
               "Avgpool3*3/2 - dense128 - dense10"),
}
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


def time_step(model, loss_fn, opt, x, y, device) -> tuple[float, float]:
    """(seconds for forward+backward+step, seconds for backward alone)."""
    _sync(device)
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    _sync(device)
    t1 = time.perf_counter()
    loss.backward()
    _sync(device)
    t2 = time.perf_counter()
    opt.step()
    _sync(device)
    return time.perf_counter() - t0, t2 - t1


def bench(net: str, rules=BENCH_RULES, batch: int = 500, steps: int = 20, warmup: int = 3,
          device: str = "cpu", seed: int = 0) -> list[dict]:
    dev = torch.device(device)
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    variants = {}
    for rule in rules:
        model, loss_fn = build(NETS[net], rule=rule)
        variants[rule] = model.to(dev)
    variants = {"torch": plain_torch(variants["bp"]).to(dev), **variants}
    opts = {k: make_optimizer("adam", m.parameters()) for k, m in variants.items()}
    loss_fn = nn.CrossEntropyLoss()
    times = {k: [] for k in variants}
    for i in range(warmup + steps):
        for k, m in variants.items():
            t = time_step(m, loss_fn, opts[k], x, y, dev)
            if i >= warmup:
                times[k].append(t)
    base_step = statistics.median(t[0] for t in times["torch"])
    base_bwd = statistics.median(t[1] for t in times["torch"])
    rows = []
    for k, ts in times.items():
        step, bwd = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        rows.append(dict(net=net, variant=k, step_ms=1e3 * step, backward_ms=1e3 * bwd,
                         step_ratio=step / base_step, backward_ratio=bwd / base_bwd))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m asymlib.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    ap.add_argument("--rules", nargs="+", default=BENCH_RULES)
    ap.add_argument("--batch", type=int, default=500, help="batch size (the report's: 500)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when present)")
    a = ap.parse_args(argv)
    devices = ["cpu", "cuda"] if a.device == "auto" and torch.cuda.is_available() else \
        ["cpu" if a.device == "auto" else a.device]
    rules = a.rules if "bp" in a.rules else ["bp", *a.rules]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch {a.batch}, "
          f"median of {a.steps} steps; ratios are to plain torch (nn.Linear/nn.Conv2d) in this run")
    for device in devices:
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        for net in a.nets:
            print(f"\n{net} on {name}")
            print(f"{'variant':<12}{'step ms':>10}{'x torch':>9}{'bwd ms':>10}{'x torch':>9}")
            for r in bench(net, rules, a.batch, a.steps, device=device):
                print(f"{r['variant']:<12}{r['step_ms']:>10.2f}{r['step_ratio']:>9.3f}"
                      f"{r['backward_ms']:>10.2f}{r['backward_ratio']:>9.3f}")


if __name__ == "__main__":
    main()
