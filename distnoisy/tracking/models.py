"""The run's networks as MLflow models (``mlflow.pytorch.log_model``), optionally registered.

``mlflow.pytorch.load_model("runs:/<run id>/model")`` then gives the final network (and
``.../model_best`` the best-by-validation one) ready to predict.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _fluent_uri(uri: str) -> Iterator[None]:
    """mlflow.pytorch.log_model uses the fluent API: point it at ``uri`` for the duration."""
    import mlflow

    old = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if old is not None:
            mlflow.set_tracking_uri(old)


def _requirements() -> list[str]:
    """The packages the model needs, pinned to this environment (saves MLflow's inference)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for package in ("torch", "torchvision", "timm"):
        with contextlib.suppress(PackageNotFoundError):
            reqs.append(f"{package}=={version(package).split('+')[0]}")
    return reqs


def log_pytorch_model(
    uri: str,
    run_id: str,
    model: nn.Module,
    example: np.ndarray,
    name: str,
    registered_name: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> str:
    """Log ``model`` to run ``run_id`` as the MLflow model ``name``, with signature and example.

    Parameters
    ----------
    uri
        Tracking URI.
    run_id
        The run (RUNNING; it stays so: the caller ends it).
    model
        The network, in eval mode on the CPU.
    example
        A float32 input batch; the signature is inferred from it and the model's output.
    name
        The model's name in the run (``runs:/<run_id>/<name>``).
    registered_name
        Register the model under this name in the model registry (a new version).
    metadata
        Stored in the MLmodel file (e.g. the input normalisation).

    Returns
    -------
    str
        The logged model's URI.
    """
    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    with _fluent_uri(uri):
        client = mlflow.MlflowClient(uri)
        status = client.get_run(run_id).info.status
        mlflow.start_run(run_id=run_id)
        kwargs = {
            "name": name,
            "signature": signature,
            "input_example": example,
            "registered_model_name": registered_name,
            "pip_requirements": _requirements(),
            "metadata": metadata,
        }
        try:
            try:
                # MLflow's default: the torch.export'ed program (loads without unpickling code).
                info = mlflow.pytorch.log_model(model, **kwargs)
            except Exception as exc:  # a model torch.export cannot trace
                log.warning(
                    "MLflow model %s: torch.export failed (%s); logging it pickled instead",
                    name,
                    " ".join(str(exc).split())[:200],
                )
                info = mlflow.pytorch.log_model(model, serialization_format="pickle", **kwargs)
        finally:
            # Leave the run as it was (the driver ends it with the run's own status).
            mlflow.end_run()
            client.update_run(run_id, status=status)
    log.info(
        "logged the MLflow model %s%s",
        info.model_uri,
        f" (registered as {registered_name} version {info.registered_model_version})"
        if registered_name
        else "",
    )
    return info.model_uri
