"""Command line: train one config, or run a named table.

    python -m asymlib run --spec "Input - dense512 - dense256 - dense10(R)" --dataset cifar10-jpeg --epochs 5
    python -m asymlib table table1 --profile cpu --seeds 1
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
import threading

import pandas as pd

from .experiments import TABLES, default_jobs, run_table
from .optim import OPTIMIZERS
from .profiles import PROFILES
from .training import Config, train


def _num(v, digits: int = 4) -> str:
    """A number for a result line; NaN/None (a diverged epoch) prints as nan."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "nan"
    return f"{v:.{digits}f}" if math.isfinite(v) else str(v)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _rules(items: list[str]) -> tuple[dict[str, str], str | None]:
    """``R=fa``, ``R*=kp`` map marks; a bare rule name is the rule of every unmarked layer."""
    marks, every = {}, None
    for it in items:
        if "=" in it:
            k, v = it.split("=", 1)
            marks[k.strip()] = v.strip()
        else:
            every = it
    return marks, every


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m asymlib", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train one config and print a result line")
    r.add_argument("--spec", required=True, help="network in the report's notation, e.g. "
                   "'Input - dense512 - dense256(R) - dense10(R) - softmax - crossentropy'")
    r.add_argument("--dataset", default="cifar10-jpeg", help="data set name (cifar10-jpeg, cifar10, "
                   "fashion-mnist, digits, mnist, cifar100, svhn, stl10, folder:<path>)")
    r.add_argument("--rule", action="append", default=[], metavar="R=RULE|RULE",
                   help="map a mark to a rule (R=fa, R*=fa-updated, R=psf(0.5)); a bare name sets "
                        "the rule of every unmarked layer; repeatable")
    r.add_argument("--keep-last-bp", action="store_true", help="the last layer stays on backprop")
    r.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    r.add_argument("--lr", type=float, default=None, help="learning rate (default: the optimizer's "
                   "report default: adam 1e-3, sgd/nesterov 1e-2, bm 1e-4)")
    r.add_argument("--batch-size", type=_positive_int, default=500)
    r.add_argument("--epochs", type=_positive_int, default=100)
    r.add_argument("--loss", choices=["crossentropy", "hingeloss"], default=None,
                   help="override the loss named in the spec")
    r.add_argument("--clip", type=float, default=None, help="clip asymmetric weight gradients to [-c, c]")
    r.add_argument("--batch-norm", action="store_true", help="batch norm after every hidden layer")
    r.add_argument("--bias", action="store_true", help="add biases (the report has none)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--train-subset", type=int, default=None, help="use this many training images")
    r.add_argument("--test-subset", type=int, default=None, help="evaluate on a fixed random n of the test images")
    r.add_argument("--val-split", type=float, default=0.0, help="hold out this fraction of training "
                   "data and evaluate on it instead of the test set")
    r.add_argument("--metrics-every", type=int, default=1, help="epochs between alignment metrics (0: never)")
    r.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="fp32, or mixed precision: bf16 (CPU or CUDA autocast), fp16 (CUDA, with a grad scaler)")
    r.add_argument("--channels-last", action="store_true", help="conv nets in torch.channels_last (faster on "
                   "this CPU: measured 1.6x for Poggio's net)")
    r.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    r.add_argument("--name", default="", help="label stored with the run")
    r.add_argument("--force", action="store_true", help="retrain even if the run is stored")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    t = sub.add_parser("table", help="run a named table and print it beside the paper's numbers")
    t.add_argument("name", choices=list(TABLES))
    t.add_argument("--profile", default="quick", choices=list(PROFILES),
                   help="; ".join(p.describe() for p in PROFILES.values()))
    t.add_argument("--seeds", type=_positive_int, default=1, help="number of seeds (0..N-1)")
    t.add_argument("--epochs", type=_positive_int, default=None, help="override the profile's epochs")
    t.add_argument("--dataset", default=None, help="override the table's data set")
    t.add_argument("--device", default="auto")
    t.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="as for run; auto (default): the profile's own (fp32, unless the table's profile says otherwise)")
    t.add_argument("--jobs", type=_positive_int, default=None,
                   help="rows trained at once, each in its own process with the cores split among them "
                        "(default: one per CPU core, or one per GPU, each job on its own)")
    t.add_argument("--cluster", default="local", choices=["local", "slurm", "auto"],
                   help="where the jobs run (submitit): this machine, a Slurm cluster, or Slurm when present")
    t.add_argument("--slurm-partition", default=None, help="with --cluster slurm: the partition")
    t.add_argument("--gpus-per-job", type=int, default=None,
                   help="with --cluster slurm: GPUs each job asks for (default: 1 with --device cuda, else 0)")
    t.add_argument("--only", nargs="*", default=None, help="run only these rows")
    t.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if threading.current_thread() is threading.main_thread():   # `kill` ends a run like Ctrl-C does
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        if a.cmd == "run":
            marks, every = _rules(a.rule)
            cfg = Config(spec=a.spec, dataset=a.dataset, rules=marks, rule=every, keep_last_bp=a.keep_last_bp,
                         optimizer=a.optimizer, lr=a.lr, batch_size=a.batch_size, epochs=a.epochs,
                         loss=a.loss, clip=a.clip, batch_norm=a.batch_norm, bias=a.bias, seed=a.seed,
                         train_subset=a.train_subset, test_subset=a.test_subset, val_split=a.val_split,
                         metrics_every=a.metrics_every, precision=a.precision, channels_last=a.channels_last,
                         device=a.device, name=a.name)
            run = train(cfg, progress=not a.no_progress, force=a.force)
            f = run.final
            status = run.status
            if status == "diverged":
                status += f" at epoch {run.diverged_epoch} (loss {_num(run.diverged_loss, 3)})"
            print(f"{status} key={cfg.key()} dataset={cfg.dataset} epochs={len(run.history)}/{cfg.epochs} "
                  f"test_acc={_num(f['test_acc'])} test_loss={_num(f['test_loss'])} train_acc={_num(f['train_acc'])}"
                  f" {'(loaded from the store)' if run.loaded else ''}")
        else:
            jobs = a.jobs or default_jobs(a.device)
            summary, _ = run_table(a.name, a.profile, a.seeds, a.epochs, a.dataset, a.device,
                                   progress=not a.no_progress, only=a.only, precision=a.precision,
                                   jobs=jobs, cluster=None if a.cluster == "auto" else a.cluster,
                                   slurm_partition=a.slurm_partition, gpus_per_job=a.gpus_per_job)
            print(TABLES[a.name].title)
            with pd.option_context("display.width", 200, "display.max_columns", 20):
                print(summary.round(2).to_string(index=False))
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: every finished epoch is checkpointed; rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
