"""Every use distnoisy makes of torch's internals, in one place, written against torch 2.14.

Today that is one: allocating a loader batch directly in shared memory. When an upgrade removes
it, ``tests/test_compat.py`` fails naming it, and :func:`new_shared_tensor` logs one warning
and takes the public route, which gives the same batch at the cost of one more copy.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)

#: The torch release these internals were read from.
WRITTEN_FOR = "2.14"

_warned = False


def new_shared_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor whose storage is in shared memory from the start.

    A batch a loader worker fills in such memory crosses to the main process without a copy,
    as ``torch.utils.data.default_collate`` arranges for its own batches. The storage comes
    from ``torch.UntypedStorage._new_shared(nbytes)`` (private; what ``default_collate`` calls
    through ``Tensor._typed_storage()``), then the public ``Tensor.set_`` views it. The public
    ``torch.empty(shape).share_memory_()`` allocates ordinary memory and copies it into shared
    memory: measured 1.3-1.4x the time of allocating and filling a 64 or 256 x 3 x 224 x 224
    batch this way (medians of 15-30, on a shared 2-core machine). Without the private method
    it is the fallback, after one warning.
    """
    global _warned
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if not callable(new_shared):
        if not _warned:
            _warned = True
            log.warning(
                "torch %s has no torch.UntypedStorage._new_shared (distnoisy is written for "
                "torch %s): loader batches are copied into shared memory (slower)",
                torch.__version__,
                WRITTEN_FOR,
            )
        return torch.empty(shape, dtype=dtype).share_memory_()
    itemsize = torch.empty(0, dtype=dtype).element_size()
    storage = new_shared(math.prod(shape) * itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
