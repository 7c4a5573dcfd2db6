"""The profiles, defined once: what ``quick``, ``cpu`` and ``full`` mean, read by :class:`Config`,
the command line's choices, the tables (:func:`asymlib.experiments.profile_config`), the book's
banner and chapter 1.

A table gives each profile its epochs (``Table.epochs`` is ``full``'s, ``cpu_epochs``, ``quick_epochs``)
and may change more for a profile (``profile_overrides``, e.g. 10,000 training images for the conv
nets on a CPU); what a profile itself changes is here. A run trained outside the tables
(``python -m asymlib run``, :func:`asymlib.train` with a hand-made config) is ``custom``.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Profile", "PROFILES", "CUSTOM", "profile_names"]


@dataclass(frozen=True)
class Profile:
    """A budget for every table: its name, what it is for, and the config fields it sets."""

    name: str
    purpose: str
    train_subset: int | None = None    # training images (None: the whole training split)
    test_subset: int | None = None     # test images (None: the whole test split)
    batch_size: int | None = None      # None: the table's

    def overrides(self) -> dict:
        """The :class:`~asymlib.training.Config` fields this profile sets."""
        return {k: v for k, v in (("train_subset", self.train_subset), ("test_subset", self.test_subset),
                                  ("batch_size", self.batch_size)) if v is not None}

    def describe(self) -> str:
        return f"{self.name}: {self.purpose}"


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("quick", "a smoke test of the pipeline (1,000 training and 1,000 test images, batch 100, 1-2 epochs); "
                     "its numbers say nothing about the papers", train_subset=1000, test_subset=1000, batch_size=100),
    Profile("cpu", "what two CPU cores finish: the full training set (10,000 images for the conv nets of chapters "
                   "6-8), the table's CPU epochs (Table 1 keeps the report's 100)"),
    Profile("full", "the paper's protocol: the full training set and the paper's epochs (a GPU's job)"),
)}
#: the profile label of a run not derived from a table
CUSTOM = "custom"


def profile_names(custom: bool = False) -> tuple[str, ...]:
    """``("quick", "cpu", "full")``, and ``"custom"`` when asked."""
    return tuple(PROFILES) + ((CUSTOM,) if custom else ())
