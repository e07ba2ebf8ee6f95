"""Set-up run in every Ray worker process of a distnoisy job (``worker_process_setup_hook``).

Kept apart from :mod:`distnoisy.launch` so that small Ray actors do not import torch.
"""

from __future__ import annotations

import os


def pin_ray_address() -> None:
    """Point ``RAY_ADDRESS`` at this worker's own cluster, and keep Ray Train's placement group
    cleaner from repeating its State API warning (:func:`ray_compat.quiet_cleaner_repeats`).

    Ray Train's ``PlacementGroupCleaner`` (which frees the placement group of a Train run whose
    controller died, e.g. a trial stopped by ASHA) queries the State API without an address;
    with several Ray clusters on one machine that lookup fails ("Found multiple active Ray
    instances"), the placement group leaks and later trials wait for resources forever.
    """
    import ray

    from distnoisy.launch import ray_compat

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    ray_compat.quiet_cleaner_repeats()
