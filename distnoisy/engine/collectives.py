"""Thin torch.distributed helpers that also work in a single process (no process group)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks (in place on a copy; returns the result)."""
    out = t.clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    out = t.clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0, in rank order.

    Ranks may hold different numbers of rows: sizes are exchanged first and rows padded, so a
    caller never has to equalise them.
    """
    if not is_distributed():
        return t
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = t
    if t.shape[0] < longest:
        pad = torch.zeros((longest - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded = torch.cat([t, pad])
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: object) -> list[object]:
    """``obj`` from every rank, in rank order (small picklable values: lists of bad keys)."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (a small picklable value)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_cat(t: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Rank 0: ``t`` of every rank concatenated along dim 0, in rank order, on the CPU; other
    ranks: None. Unlike :func:`all_gather_cat` only rank 0 receives the rows (for columns of
    every sample, which no other rank needs). ``device``: where the collective runs (the
    CUDA device under NCCL). Bool tensors travel as uint8."""
    if not is_distributed():
        return t
    kind = t.dtype
    send = (t.to(torch.uint8) if kind == torch.bool else t).to(device)
    n = torch.tensor([send.shape[0]], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    pad = max(counts) - send.shape[0]
    if pad:
        send = torch.cat([send, send.new_zeros((pad, *send.shape[1:]))])
    parts = [torch.empty_like(send) for _ in counts] if rank() == 0 else None
    dist.gather(send.contiguous(), parts, dst=0)
    if parts is None:
        return None
    whole = torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).cpu()
    return whole.to(torch.bool) if kind == torch.bool else whole
