"""The lists of choices of config keys that more than one module checks, defined once.

Dependency-free so that :mod:`distnoisy.config` (torch- and numpy-free) and the data modules
that implement the choices import the same tuples. Where a registry implements a list
(``data.name``: :data:`distnoisy.data.prepare.DATASET_LOADERS`; ``noise.kind``:
:data:`distnoisy.data.noise.NOISE` plus ``none`` and ``file``), the registry is the source of
truth and ``tests/test_shape.py`` checks that the tuple here names exactly its entries.
"""

from __future__ import annotations

#: ``data.name``: the datasets :func:`distnoisy.data.prepare.prepare_data` can load.
DATASETS = ("digits", "fashion_mnist", "longtail", "cifar10", "cifar100", "clothing1m", "shards")
#: ``noise.kind``: ``none``, the registered generators, ``file`` (a given label file) and
#: ``cifar_n`` (CIFAR-10N/100N human labels).
NOISE_KINDS = ("none", "symmetric", "pair", "instance", "file", "cifar_n")
#: ``noise.cifar_n``: CIFAR-10N's label sets, then CIFAR-100N's
#: (:data:`distnoisy.data.cifar_n.LABEL_SETS`).
CIFAR_N_SETS = ("aggre", "random1", "random2", "random3", "worse", "noisy_fine", "noisy_coarse")
#: ``noise.instance_features``: feature maps of the instance generator; the first is the default.
INSTANCE_FEATURES = ("raw", "standardized")
#: ``scaling.launcher``.
LAUNCHERS = ("ray", "local")
#: ``data.split``: how shards reach the DDP ranks.
SPLITS = ("sample", "shard")
#: ``store.backend``: the per-sample store's layout (``auto`` chooses by size).
STORE_BACKENDS = ("auto", "replicated", "partitioned")
#: ``store.dtype``: storage of the store's targets, histories and probabilities.
STORE_DTYPES = ("float32", "float16", "bfloat16")
