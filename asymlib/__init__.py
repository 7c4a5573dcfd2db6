"""asymlib: learning without weight symmetry, reproduced.

Feedback-rule layers (:mod:`asymlib.layers`), the rules (:mod:`asymlib.rules`), a builder for the
report's network notation (:func:`build`), losses, optimizers and alignment metrics; data sets,
training with a result store (:class:`Config`, :func:`train`) and the book's tables (:func:`run_table`);
:func:`convert` swaps the layers of any torch model (torchvision's included) for feedback layers, and
:mod:`asymlib.models` builds ResNets, an AlexNet-style net and plain conv nets with any rule.
"""
import os as _os

# `python -m asymlib` (and .book, .bench) restarts once with tcmalloc or jemalloc preloaded when one is
# installed: glibc faults the pages of every freed multi-megabyte tensor back in at the next step
# (asymlib.malloc; ASYMLIB_MALLOC=system opts out). Before torch is imported, so the restart is cheap.
from . import malloc as _malloc

_malloc.preload_allocator(_malloc._module_being_run() or "")

# Transparent huge pages for torch's large CPU tensors (read by torch at its first allocation, so only
# when asymlib is imported before torch; a value you set wins). Fresh multi-megabyte tensors are then
# mapped 2 MB at a time instead of 4 kB: 3-5x faster to allocate here, 27% off the conv nets' step.
_THP_SET_HERE = "THP_MEM_ALLOC_ENABLE" not in _os.environ   # (the benchmark's --since unsets it again)
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .builder import DEFAULT_MARKS, REPORT_CONV_PADDING, FeedbackNet, Network, build, parse_spec
from .layers import Conv2d, FeedbackLayer, Linear, LocallyConnected2d, exact_backprop, feedback_layers
from .losses import HingeLoss, get_loss
from .metrics import alignment, angle, delta_alignment, weight_alignment
from .optim import BatchManhattan, clip_asymmetric_grads, make_optimizer
from .rules import RULES, FeedbackRule, get_rule
from .data import load_dataset
from .training import Config, Run, train
from .experiments import TABLES, run_table
from .convert import convert
from .models import alexnet, plain_convnet, resnet

__version__ = "0.1.0"

__all__ = [
    "build", "parse_spec", "Network", "FeedbackNet", "DEFAULT_MARKS", "REPORT_CONV_PADDING",
    "Linear", "Conv2d", "LocallyConnected2d", "FeedbackLayer", "exact_backprop", "feedback_layers",
    "HingeLoss", "get_loss", "alignment", "angle", "delta_alignment", "weight_alignment",
    "BatchManhattan", "clip_asymmetric_grads", "make_optimizer", "RULES", "FeedbackRule", "get_rule",
    "load_dataset", "Config", "Run", "train", "TABLES", "run_table", "convert", "resnet", "alexnet",
    "plain_convnet",
]
