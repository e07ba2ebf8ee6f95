"""The per-sample statistics store: rows keyed by global sample index, shared by all workers.

Two backends with one interface (``declare``, ``get``, ``stage``, ``flush``, ``set``,
``prefetch``, ``local``, ``owned_range``, ``mean``, ``materialize``, ``state_dict``,
``load_state_dict``, ``bytes_per_sample``, ``close``):

- :class:`~distnoisy.store.replicated.SampleStore`: every rank holds every row; reads are local,
  writes are all-gathered every step. Fastest while a replica fits comfortably in memory;
- :class:`~distnoisy.store.partitioned.PartitionedStore`: each rank owns about N/W rows; reads
  and writes of a batch's rows are exchanged with ``all_to_all``, ahead of and behind the step.

:func:`make_store` picks one from ``store.backend`` (``auto`` by size, see
:data:`AUTO_PARTITION_BYTES`). :mod:`distnoisy.store.export` writes and reads the partitioned
Parquet export; :mod:`distnoisy.store.history` computes per-sample training-dynamics aggregates.
"""

from __future__ import annotations

import torch

from distnoisy.core.choices import STORE_BACKENDS
from distnoisy.store.base import FLOAT_DTYPES, FieldSpec, bytes_per_sample
from distnoisy.store.partitioned import PartitionedStore
from distnoisy.store.replicated import SampleStore

#: ``store.backend``.
BACKENDS = STORE_BACKENDS
#: ``auto`` partitions when one replica of the store would exceed this many bytes (1 GiB) on a
#: run with several workers: below it the replicated backend's local reads are faster, above it
#: W replicas per node start to compete with the data pipeline for memory (docs/benchmarks.md).
AUTO_PARTITION_BYTES = 1 << 30

Store = SampleStore | PartitionedStore

__all__ = [
    "AUTO_PARTITION_BYTES",
    "BACKENDS",
    "FLOAT_DTYPES",
    "FieldSpec",
    "PartitionedStore",
    "SampleStore",
    "Store",
    "choose_backend",
    "make_store",
]


def choose_backend(
    backend: str,
    num_samples: int,
    specs: dict[str, FieldSpec],
    float_dtype: torch.dtype,
    world_size: int,
) -> str:
    """``replicated`` or ``partitioned`` for ``store.backend`` (``auto``: by replica size)."""
    if backend not in BACKENDS:
        raise ValueError(f"store.backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    replica = num_samples * sum(bytes_per_sample(specs, float_dtype).values())
    return "partitioned" if world_size > 1 and replica > AUTO_PARTITION_BYTES else "replicated"


def make_store(
    num_samples: int,
    specs: dict[str, FieldSpec],
    *,
    backend: str = "auto",
    dtype: str = "float32",
    comm_device: torch.device | str = "cpu",
    world_size: int = 1,
) -> Store:
    """A store with ``specs`` declared (a collective for the partitioned backend).

    Parameters
    ----------
    num_samples
        N, the rows.
    specs
        The fields to declare (the run's and the method's); more may be declared later.
    backend
        ``auto``, ``replicated`` or ``partitioned`` (``store.backend``).
    dtype
        Storage of the ``lowp`` float fields: ``float32``, ``float16`` or ``bfloat16``.
    comm_device
        Device of the replicated backend's collective buffers.
    world_size
        Number of ranks (``auto`` never partitions a single process).
    """
    float_dtype = FLOAT_DTYPES[dtype]
    chosen = choose_backend(backend, num_samples, specs, float_dtype, world_size)
    cls = PartitionedStore if chosen == "partitioned" else SampleStore
    store = cls(num_samples, comm_device=comm_device, float_dtype=float_dtype)
    for name, spec in specs.items():
        store.declare(name, spec)
    return store
