"""Data layer: WebDataset shard sets, their manifest and label table, and the training streams.

Submodules (import them directly; this package imports nothing heavy on purpose):

- :mod:`distnoisy.data.shards` -- write a shard set (``write_shards``), read its ``manifest.json``
  (``read_manifest``) and its label table ``labels.parquet`` (``read_labels``), locally or from
  a URL.
- :mod:`distnoisy.data.fs` -- local paths and fsspec URLs (``s3://``, ``gs://``, ``https://``,
  ...) behind one set of functions: open, read, list, brace patterns, one-line errors.
- :mod:`distnoisy.data.digits` -- the bundled scikit-learn digits as a train/test shard set
  (``prepare_digits``), the default dataset of ``python -m distnoisy.train``.
- :mod:`distnoisy.data.fashion_mnist` -- Fashion-MNIST from its idx files (``read_idx``,
  ``prepare_fashion_mnist``; also a converter CLI).
- :mod:`distnoisy.data.cache` -- the cache both write into: sets reused while their parameters
  are unchanged, installed atomically.
- :mod:`distnoisy.data.stream` -- ``TrainStream`` / ``EvalStream``: decoded, augmented batches
  ``{"image", "index"}`` with exactly the same number of batches on every DDP rank, and the image
  transforms (``make_transform``).
- :mod:`distnoisy.data.noise` -- synthetic label noise, saved as a label file keyed by sample index.
- :mod:`distnoisy.data.clothing1m`, :mod:`distnoisy.data.cifar`, :mod:`distnoisy.data.folder` --
  converters (``python -m ...``) from the distributed layouts to shard sets, built on
  :mod:`distnoisy.data.convert` (parallel, resumable, progress).
"""
