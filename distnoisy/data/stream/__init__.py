"""Decoded, augmented batches from WebDataset shards inside one DDP rank.

A batch is ``{"image": Tensor[b, C, H, W], "index": LongTensor[b]}``. The global sample index is
the spine: labels come from the trainer's label table (``labels.parquet`` or a noise file), never
from the shard.

Equal batch counts (the WebDataset DDP hang cannot happen)
-----------------------------------------------------------
:class:`TrainStream` yields exactly ``steps_per_epoch = N // (world_size * local_batch_size)``
batches of exactly ``local_batch_size`` on every rank, computed from the manifest alone. The loop
is driven by that count, not by how many samples a rank happens to read: the sample stream of an
epoch is endless (after the last shard it starts another pass over the shards, in a new order),
so uneven shards, more ranks than shards, unreadable tar members or corrupt images can change
*which* samples a rank sees, never how many batches it yields.

Two ways of splitting the data over ranks (``split=``):

``"sample"`` (exact; results do not depend on the number of ranks)
    Every rank reads the same global stream: shard order permuted by ``(seed, epoch)``,
    ``open_shards`` shards read at once and interleaved at random, then a shuffle buffer; every
    RNG is seeded by ``(seed, epoch)``, the same on every rank. After the first
    ``T = N - steps * B`` positions (the *reserve*, see below; ``B = world_size *
    local_batch_size``), global batch ``g`` is the next ``B`` positions and rank ``r`` takes the
    ``r``-th contiguous chunk of ``local_batch_size`` of it. Only the selected samples are
    decoded. Hence the concatenation over ranks of batch ``g`` equals batch ``g`` of a single
    process with batch size ``B``. Every rank walks every shard's samples (reading only the
    bytes of the samples it decodes when the shards are local files, see below), so this mode
    suits data sets a rank can walk each epoch (digits, CIFAR); from object storage every rank
    downloads every shard: use ``"shard"`` for Clothing1M/ImageNet-size data.
``"shard"`` (scales: a rank reads only its shards)
    Shards permuted by ``(seed, epoch)`` and assigned greedily by sample count (largest first,
    to the least-loaded rank); a rank shuffles its own samples (seed ``(seed, epoch, rank)``).
    Its ``open_shards`` are interleaved as in ``"sample"`` mode. A rank with more than
    ``steps * local_batch_size`` samples does not use the excess (its reserve); a rank with
    fewer reads its shards again. With fewer shards than ranks the stream
    falls back to ``"sample"`` (logged).

Mixing
------
A shard set converted from a class-ordered source (an image folder in listing order) holds one or
two classes per shard. Three things mix it: the shard order is shuffled every pass, ``open_shards``
shards are read at once with their samples interleaved at random (:func:`_interleave`), and the
shuffle buffer reorders what the interleave yields. The converters also write samples into shards
in a shuffled order, so their sets are mixed already; the training loop measures the class mix of
its batches (:mod:`distnoisy.data.mixing`) and warns when it is poor.

The reserve and bad samples
---------------------------
The ``T`` samples that the floor ``N // B`` leaves out of an epoch are taken from the *front* of
the (shuffled) stream rather than the back, so they are at hand, without look-ahead, to replace
samples that cannot be used: a corrupt image (decode fails), an image of the wrong size, or one
the transform rejects. Such a sample is skipped, counted and recorded in
:attr:`TrainStream.bad_samples` as ``(key, reason)``; its slot is filled from this rank's
reserve (rotated by the batch number, so the choice does not depend on other batches), and if the
reserve is used up, by repeating a good sample of the same batch. Samples lost at the tar level
(an unreadable or truncated shard, recorded under the shard's file name; a shard yielding fewer
samples than its manifest count is reported even when tarfile raises nothing, and counts as
that many bad samples) are the same on every rank in ``"sample"`` mode and simply shorten the
pass: the next pass fills the epoch, so the lost samples are never trained on.
Replacements make the W-invariance above approximate, for the batches concerned only.

Worker processes
----------------
``num_workers > 0`` runs the reading and decoding in a ``torch.utils.data.DataLoader`` with the
``forkserver`` context (Ray's advice for processes inside actors) and persistent workers. Every
loader worker reads the same stream as the rank and decodes only the batches with
``batch_no % num_workers == worker``; the DataLoader collects workers round-robin in order, so
the batches, and their order, are those of ``num_workers=0``. Each loader worker walks the
rank's whole stream. For local shard files that costs almost nothing: the first pass over a
shard builds an index of its image members (one tar-header pass, kept per process), later
passes walk the index, and a worker reads only the bytes of the samples it decodes (a
positioned read each). Shards given as URLs are streamed through webdataset, every byte by
every loader worker. Everything a worker runs is a
module-level object, so it pickles; a script that starts streams with workers needs the usual
``if __name__ == "__main__":`` guard (forkserver re-imports the main module).

Modules
-------
:mod:`~distnoisy.data.stream.seeds` (``mix_seed``), :mod:`~distnoisy.data.stream.transforms`,
:mod:`~distnoisy.data.stream.decode`, :mod:`~distnoisy.data.stream.records` (what a bad-sample
record counts for), :mod:`~distnoisy.data.stream.tar_index` (local shards),
:mod:`~distnoisy.data.stream.readers` (local or URL shards), :mod:`~distnoisy.data.stream.sampling`
(interleaving, shuffling, shard assignment, balanced subsets),
:mod:`~distnoisy.data.stream.batching`, :mod:`~distnoisy.data.stream.train` (``TrainStream``) and
:mod:`~distnoisy.data.stream.eval` (``EvalStream``). The names below are re-exported here.
"""

from distnoisy.data.stream.decode import decode_image_bytes
from distnoisy.data.stream.eval import EvalStream
from distnoisy.data.stream.readers import _read_raw, _read_webdataset
from distnoisy.data.stream.records import count_bad, samples_lost
from distnoisy.data.stream.sampling import (
    BalancedSubset,
    KeptSubset,
    _buffer_shuffle,
    _interleave,
    assign_shards,
)
from distnoisy.data.stream.seeds import mix_seed
from distnoisy.data.stream.tar_index import Raw, _read_indexed, _shard_index
from distnoisy.data.stream.train import StreamStats, TrainStream
from distnoisy.data.stream.transforms import (
    TRANSFORM_KINDS,
    ImageTransform,
    Transform,
    make_transform,
)

__all__ = [
    "TRANSFORM_KINDS",
    "BalancedSubset",
    "EvalStream",
    "ImageTransform",
    "KeptSubset",
    "Raw",
    "StreamStats",
    "TrainStream",
    "Transform",
    "_buffer_shuffle",
    "_interleave",
    "_read_indexed",
    "_read_raw",
    "_read_webdataset",
    "_shard_index",
    "assign_shards",
    "count_bad",
    "decode_image_bytes",
    "make_transform",
    "mix_seed",
    "samples_lost",
]
