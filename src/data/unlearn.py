"""Forget/retain pairing for unlearning: each forget sample travels with a retain sample."""

from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

from data.collators import Parts

RETAIN_PAIRINGS = ("random", "length_matched")


class ForgetRetainDataset(Dataset):
    """Item ``i`` is ``{"forget": forget[i], "retain": retain[j]}`` with ``j`` drawn at random.

    The draw is a pure function of (seed, epoch, i), never of the process: runs are reproducible, each
    epoch pairs a forget sample with fresh retain samples, and a forget sample gets the same partner
    whatever the number of processes. Ranks still draw different retain samples, because they read
    different forget samples (seeding each rank's draws alike, as a per-rank generator seeded with the
    seed alone would, would make them train on the same retain batches).

    ``retain_pairing="length_matched"`` (``data.retain_pairing``) draws ``j`` among the retain samples
    of about the same length rank: with the forget samples ranked by token length ``r = 0..F-1`` and
    the retain samples sorted by length, forget sample ``r`` draws from the ``r``-th of ``F`` equal
    consecutive slices of that order. Every retain sample stays in exactly one slice (when the retain
    set is at least as large), so each is drawn as often as with ``random``, but a batch of similar
    forget lengths (``train_sampling_strategy=group_by_length``) gets retain partners of similar
    lengths too: less padding in the retain half of the batch.

    Args:
        forget: the forget dataset (its length is the epoch length).
        retain: the retain dataset, or None for methods that use no retain term.
        seed: base seed of the draws.
        retain_pairing: ``random`` (default) or ``length_matched``.
        retain_from_global_rng: (``data.retain_partners_from_global_rng``) ``j`` is drawn when the item is
            read, with ``torch.randint`` from torch's global generator, as open-unlearning draws it (the
            pairs then depend on everything else that uses that generator, and are the same on every rank).
    """

    def __init__(self, forget: Dataset, retain: Dataset | None = None, seed: int = 0,
                 retain_pairing: str = "random", retain_from_global_rng: bool = False):
        if len(forget) == 0:
            raise ValueError("the forget set is empty: nothing to unlearn")
        if retain is not None and len(retain) == 0:
            raise ValueError("the retain set is empty; give a non-empty retain set or data.retain=null")
        if retain_pairing not in RETAIN_PAIRINGS:
            raise ValueError(f"retain_pairing={retain_pairing!r}; valid: {', '.join(RETAIN_PAIRINGS)}")
        self.forget, self.retain = forget, retain
        self.seed, self.epoch = seed, 0
        self.retain_from_global_rng = retain_from_global_rng
        self._retain_by_length: list[int] = []
        self._retain_slices: list[tuple[int, int]] = []
        if retain is not None and retain_pairing == "length_matched":
            self._match_lengths()

    def _match_lengths(self) -> None:
        forget_lengths = self.lengths()
        if not hasattr(self.retain, "lengths"):
            raise TypeError(f"the retain dataset {type(self.retain).__name__} has no lengths(); "
                            "retain_pairing=length_matched needs one")
        retain_lengths = list(self.retain.lengths())
        n_forget, n_retain = len(forget_lengths), len(retain_lengths)
        self._retain_by_length = sorted(range(n_retain), key=lambda j: (retain_lengths[j], j))
        self._retain_slices = [(0, 0)] * n_forget
        for rank, i in enumerate(sorted(range(n_forget), key=lambda k: (forget_lengths[k], k))):
            start = rank * n_retain // n_forget
            self._retain_slices[i] = (start, max(start + 1, (rank + 1) * n_retain // n_forget))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def retain_index(self, index: int) -> int:
        if self.retain_from_global_rng:
            return int(torch.randint(0, len(self.retain), (1,)).item())
        # "-0-" stands where the process index once was: the draws of earlier single-process runs are kept
        rng = random.Random(f"{self.seed}-0-{self.epoch}-{index}")
        if not self._retain_slices:
            return rng.randrange(len(self.retain))
        start, stop = self._retain_slices[index]
        return self._retain_by_length[start + rng.randrange(stop - start)]

    def __len__(self) -> int:
        return len(self.forget)

    def lengths(self) -> list[int]:
        """Token length of each forget item, for length-grouped sampling (see ``retain_pairing`` for the partners)."""
        if hasattr(self.forget, "lengths"):
            return list(self.forget.lengths())
        raise TypeError(f"the forget dataset {type(self.forget).__name__} has no lengths(); "
                        "train_sampling_strategy=group_by_length needs one")

    def __getitem__(self, index: int) -> Parts:
        if self.retain is None:
            return Parts(forget=self.forget[index])
        return Parts(forget=self.forget[index], retain=self.retain[self.retain_index(index)])
