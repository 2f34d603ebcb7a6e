"""Data-parallel training's bookkeeping, one process standing in for one of several (a
stand-in for Lightning Fabric that answers as the other processes would): what every
process must draw, weigh or keep alike."""

from __future__ import annotations

import torch

from paser.train.distributed import Dist
from paser.train.finetune import explore_greedy
from paser.train.policy import explore


class OtherRank:
    """Fabric as rank 1 of 2 sees it: a broadcast from rank 0 gives ``rank0_rng`` (rank
    0's generator state) for a generator state."""

    global_rank, world_size = 1, 2

    def __init__(self, rank0_rng: torch.Tensor):
        self.rank0_rng = rank0_rng

    def broadcast(self, obj, src=0):
        assert src == 0 and obj.dtype == torch.uint8
        return self.rank0_rng.clone()


def _rank0_state(seed: int) -> torch.Tensor:
    return torch.Generator().manual_seed(seed).get_state()


def test_same_draws_are_rank_0s_and_leave_the_process_its_own():
    dist = Dist(torch.device("cpu"), OtherRank(_rank0_state(1)))
    torch.manual_seed(2)  # this process's generator, moved on by its own dropout
    with dist.same_draws():
        drawn = torch.randperm(10)
    assert drawn.tolist() == torch.randperm(10, generator=torch.Generator().manual_seed(1)).tolist()
    assert torch.rand(3).tolist() == torch.rand(3, generator=torch.Generator().manual_seed(2)).tolist()


def test_exploration_on_another_process_is_its_rows_of_rank_0s():
    logits = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))  # [B, P, K+1]
    rank0 = _rank0_state(1)
    for alpha in (0.0, 1.0):  # uniformly at random, then sampled from the policy
        torch.set_rng_state(rank0)
        whole = explore(logits, alpha, torch.arange(2), 2)  # one process, the whole batch
        torch.manual_seed(99)  # rank 1's own generator is elsewhere
        share = explore(logits[1:], alpha, torch.tensor([1]), 2,
                        Dist(torch.device("cpu"), OtherRank(rank0)))
        assert share.tolist() == whole[1:].tolist()
    torch.set_rng_state(rank0)
    whole = explore_greedy(logits, 0.0, torch.arange(2), 2)
    torch.manual_seed(99)
    share = explore_greedy(logits[1:], 0.0, torch.tensor([1]), 2,
                           Dist(torch.device("cpu"), OtherRank(rank0)))
    assert share.tolist() == whole[1:].tolist()
