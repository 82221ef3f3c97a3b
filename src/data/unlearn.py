"""Forget/retain pairing for unlearning: each forget sample travels with a retain sample."""

from __future__ import annotations

import random

from torch.utils.data import Dataset


class ForgetRetainDataset(Dataset):
    """Item ``i`` is ``{"forget": forget[i], "retain": retain[j]}`` with ``j`` drawn at random.

    The draw is a pure function of (seed, rank, epoch, i): runs are reproducible, each epoch pairs a
    forget sample with fresh retain samples, and with several processes every rank draws different
    retain samples (seeding all ranks alike would make them train on the same retain batches).

    Args:
        forget: the forget dataset (its length is the epoch length).
        retain: the retain dataset, or None for methods that use no retain term.
        seed: base seed of the draws.
        rank: process index in distributed runs.
    """

    def __init__(self, forget: Dataset, retain: Dataset | None = None, seed: int = 0, rank: int = 0):
        if len(forget) == 0:
            raise ValueError("the forget set is empty: nothing to unlearn")
        if retain is not None and len(retain) == 0:
            raise ValueError("the retain set is empty; give a non-empty retain set or data.retain=null")
        self.forget, self.retain = forget, retain
        self.seed, self.rank, self.epoch = seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def retain_index(self, index: int) -> int:
        rng = random.Random(f"{self.seed}-{self.rank}-{self.epoch}-{index}")
        return rng.randrange(len(self.retain))

    def __len__(self) -> int:
        return len(self.forget)

    def lengths(self) -> list[int]:
        """Token length of each forget item, for length-grouped sampling (retain partners are drawn at random)."""
        if hasattr(self.forget, "lengths"):
            return list(self.forget.lengths())
        raise TypeError(f"the forget dataset {type(self.forget).__name__} has no lengths(); "
                        "train_sampling_strategy=group_by_length needs one")

    def __getitem__(self, index: int) -> dict:
        item = {"forget": self.forget[index]}
        if self.retain is not None:
            item["retain"] = self.retain[self.retain_index(index)]
        return item
