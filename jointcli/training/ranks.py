"""A training process's place among the data-parallel processes (training/data_parallel.py starts them).

>>> Ranks(0, 2).share([7, 2, 5, 0, 3]), Ranks(1, 2).share([7, 2, 5, 0, 3]), Ranks().share([7, 2, 5])
([7, 5, 3], [2, 0], [7, 2, 5])
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes: `index` of `count` (0 of 1: alone)."""

    index: int = 0
    count: int = 1

    @property
    def main(self) -> bool:
        """Process 0: the one that writes the train log, the checkpoints and the adapter."""
        return self.index == 0

    def share(self, rows: list[int]) -> list[int]:
        """The rows of an optimizer step this process computes: every count-th, from its index."""
        return rows[self.index :: self.count]

    def sum_step(self, params: list, nll: float, tokens: int) -> tuple[float, int]:
        """Sum the gradients of `params` (in place), the step's NLL and token count over the processes."""
        if self.count == 1:
            return nll, tokens
        import torch
        import torch.distributed as dist

        for p in params:  # a process whose share was empty has no gradients yet
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat(
            [p.grad.reshape(-1) for p in params]
            + [torch.tensor([nll, float(tokens)], dtype=params[0].grad.dtype, device=params[0].device)]
        )
        dist.all_reduce(flat)  # one call for the whole adapter
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return float(flat[-2]), int(round(float(flat[-1])))

    def barrier(self) -> None:
        """Wait until every process gets here (nothing to wait for alone)."""
        if self.count > 1:
            import torch.distributed as dist

            dist.barrier()
