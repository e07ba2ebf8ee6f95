"""LIMIT (Harutyunyan et al., ICML 2020): the classifier learns only from a predicted gradient.

Two networks: the ``classifier`` and a ``qnet`` of the same architecture (or ``method.q_model``)
that sees only the inputs. One optimizer trains both on
``carrier(z; ĝ) + info(r, ỹ) + L·mean‖sg(p) - r‖²`` (:func:`~distnoisy.losses.limit.limit_terms`):
the classifier's logits receive ``ĝ / B = (softmax(z) - softmax(u)) / B`` and nothing that
depends on the labels; the q-network fits the noisy labels with the Brier (gaussian) or MAE
(laplace) loss. docs/methods.md#limit.

- ``warmup_epochs``: the classifier is frozen for the first k epochs so the q-network learns
  first (official ``warm_up``).
- ``sample_from_q``: noise on ``ĝ`` in the classifier's backward (Gaussian std
  ``sqrt(1/(2·lamb))`` or Laplace scale ``1/lamb``).
- ``q_init``: start the q-network from a finished run (its ``weights.pt``, e.g. a CE run: the
  official "loaded" variant) or from a state-dict file.

Label-issue score: ``1 - softmax(u_i)[given]`` with ``u_i`` the q-network's logits at the
sample's last training visit (store field ``limit_q_prob``; ``limit_grad_norm`` holds ‖ĝ_i‖).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distnoisy.core.errors import ConfigError
from distnoisy.core.method_params import MethodParams
from distnoisy.losses.limit import limit_terms, sample_grad_noise
from distnoisy.methods.base import (
    METHODS,
    Method,
    Networks,
    Optimizers,
    PrepareContext,
    StepInput,
    StepOutput,
    StepResult,
    full_precision,
    loss_region,
)
from distnoisy.store import FieldSpec

VARIANTS = ("gaussian", "laplace")
#: Which network of a finished run's ``weights.pt`` initialises the q-network, in order.
_Q_INIT_PREFERENCE = ("model", "classifier", "net1")


@dataclass
class LIMITParams(MethodParams):
    # gaussian = LIMIT_G (Brier fit of q), laplace = LIMIT_L (MAE fit). L: weight of mean‖ĝ‖²
    # (official grids {0, 0.1, ..., 30}, advised 0.03-10, METHODS §3.3). The defaults are the
    # best of {gaussian, laplace} x {1, 10} on digits at 40% symmetric noise (60 epochs, Adam):
    # laplace/10 96.4% clean test, 0.4% memorized; gaussian/10 93.9%, 16%; gaussian/1 76%, 92%.
    # Sweep them per dataset with tune_spaces/limit.yaml.
    variant: str = "laplace"
    grad_weight_decay: float = 10.0
    # Epochs with the classifier frozen while q learns (official default 0).
    warmup_epochs: int = 0
    # Add noise to ĝ (official default off); lamb sets its scale.
    sample_from_q: bool = False
    lamb: float = 1.0
    # Architecture of the q-network; None = model.name (the paper's setting).
    q_model: str | None = None
    # Initialise q from a finished run dir (its weights.pt) or a state-dict file ("loaded").
    q_init: str | None = None


def _out_features(net: nn.Module) -> int | None:
    head = getattr(net, "classifier", None)
    return int(head.out_features) if isinstance(head, nn.Linear) else None


def load_q_init(path_str: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, description) for ``method.q_init``: a run dir or a ``.pt`` file.

    Loaded with ``weights_only=True`` (no pickled code runs). A run's ``weights.pt`` maps
    network names to state dicts; the first of ``model``, ``classifier``, ``net1`` is used.
    """
    path = Path(path_str).expanduser()
    if path.is_dir():
        path = path / "weights.pt"
    if not path.is_file():
        raise ConfigError(
            f"method.q_init={path_str}: no such file ({path}); give a finished run's output "
            "directory (it holds weights.pt) or a state-dict .pt file"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(
            f"method.q_init: cannot load {path} as a weights-only state dict ({exc}); distnoisy "
            "never unpickles code"
        ) from None
    what = str(path)
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Mapping) for v in obj.values()):
        name = next((n for n in _Q_INIT_PREFERENCE if n in obj), None)
        if name is None:
            raise ConfigError(
                f"method.q_init: {path} holds networks {sorted(obj)}, none of "
                f"{list(_Q_INIT_PREFERENCE)}"
            )
        obj, what = obj[name], f"{path} [{name}]"
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"method.q_init: {path} is not a state dict (name -> tensor)")
    return dict(obj), what


#: Tag of LIMIT's noise in :func:`_noise_seed` (other keyed draws use other tags).
_NOISE_TAG = 0x4C494D4954  # "LIMIT"


def _noise_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed from (run seed, epoch, global sample index), hashed by numpy's
    ``SeedSequence`` so that nearby keys give unrelated streams."""
    state = np.random.SeedSequence([_NOISE_TAG, seed % 2**64, epoch, index]).generate_state(
        1, np.uint64
    )
    return int(state[0])


@METHODS.register("limit")
class LIMIT(Method):
    """Classifier trained by the q-network's predicted gradient; q fits the noisy labels."""

    Params = LIMITParams
    score_description = "1 - q-network probability of the given label (last training visit)"

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)

    @classmethod
    def validate_params(cls, params: Any) -> None:
        p = params
        if p.variant not in VARIANTS:
            raise ConfigError(f"method.variant={p.variant!r} must be one of {', '.join(VARIANTS)}")
        if p.grad_weight_decay < 0:
            raise ConfigError(f"method.grad_weight_decay={p.grad_weight_decay} must be >= 0")
        if p.warmup_epochs < 0:
            raise ConfigError(f"method.warmup_epochs={p.warmup_epochs} must be >= 0")
        if p.sample_from_q and p.lamb <= 0:
            raise ConfigError(f"method.lamb={p.lamb} must be > 0 with method.sample_from_q=true")

    @classmethod
    def prepare_resources(cls, params: Any, context: PrepareContext) -> dict[str, Any]:
        # Workers may run in another directory (Ray, Tune trials): pass an absolute path.
        if params.q_init is None:
            return {}
        return {"q_init": str(Path(params.q_init).expanduser().resolve())}

    def fields(self) -> dict[str, FieldSpec]:
        c = self.num_classes
        return {
            "limit_q_prob": FieldSpec(shape=(c,), fill=1.0 / c, lowp=True),
            "limit_grad_norm": FieldSpec(fill=float("nan")),
        }

    def build_networks(self, build: Callable[..., nn.Module]) -> Networks:
        classifier = build()
        qnet = build() if self.params.q_model is None else build(self.params.q_model)
        c_out, q_out = _out_features(classifier), _out_features(qnet)
        q_init = self.resources.get("q_init", self.params.q_init)
        if q_init is not None:
            state, what = load_q_init(q_init)
            head = state.get("classifier.weight")
            if head is not None and c_out is not None and head.shape[0] != c_out:
                q_out = int(head.shape[0])
            else:
                try:
                    qnet.load_state_dict(state)
                except RuntimeError as exc:
                    first = str(exc).strip().splitlines()[-1].strip()
                    raise ConfigError(
                        f"method.q_init: {what} does not fit the q-network "
                        f"({self.params.q_model or 'model.name'}): {first}"
                    ) from None
        if c_out is not None and q_out is not None and q_out != c_out:
            source = f"method.q_init={self.params.q_init}" if self.params.q_init else "q_model"
            raise ConfigError(
                f"LIMIT's q-network ({source}) outputs {q_out} values per sample but the "
                f"classifier has {c_out} classes: the q-network predicts the gradient of every "
                f"classifier logit, so it needs {c_out} outputs (initialise it from a run on "
                "the same classes)"
            )
        return {"classifier": classifier, "qnet": qnet}

    def build_optimizers(
        self, nets: Networks, make: Callable[[Any], torch.optim.Optimizer]
    ) -> Optimizers:
        # One optimizer over both networks, as the official code.
        params = itertools.chain(nets["classifier"].parameters(), nets["qnet"].parameters())
        return {"limit": make(params)}

    def predict(self, nets: Networks, x: torch.Tensor) -> torch.Tensor:
        return nets["classifier"](x)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        raise TypeError("LIMIT trains a classifier and a q-network through train_step")

    def _noise(
        self, batch: StepInput, shape: torch.Size, device: torch.device
    ) -> torch.Tensor | None:
        """The gradient noise of the batch's rows, each row from a generator keyed by (run
        seed, epoch, global sample index): the same draws whichever rank trains the sample
        and whatever the number of ranks (a resized elastic run draws what a fixed-size one
        does) and after any resume, with no generator state to checkpoint."""
        if not self.params.sample_from_q:
            return None
        p = self.params
        rows = [
            sample_grad_noise(
                shape[1:],
                p.variant,
                p.lamb,
                torch.Generator().manual_seed(_noise_seed(self.seed, batch.epoch, i)),
            )
            for i in batch.index.tolist()
        ]
        return torch.stack(rows).to(device) if rows else torch.zeros(shape, device=device)

    def train_step(self, batch: StepInput, nets: Networks, opts: Optimizers) -> StepResult:
        assert self.store is not None
        p = self.params
        frozen = batch.epoch < p.warmup_epochs
        # Frozen classifier: no graph through it (and no DDP gradient sync for it).
        with torch.no_grad() if frozen else contextlib.nullcontext():
            z = nets["classifier"](batch.x)
        u = nets["qnet"](batch.x)
        # Losses in float32 whatever the autocast precision of the forward passes.
        z, u = full_precision(z), full_precision(u)
        with loss_region(z):
            carrier, q_loss = limit_terms(
                z,
                u,
                batch.y,
                p.variant,
                p.grad_weight_decay,
                g_noise=self._noise(batch, z.shape, z.device),
            )
        opt = opts["limit"]
        opt.zero_grad(set_to_none=True)
        self.backward(q_loss if frozen else carrier + q_loss)
        self.optimizer_step(opt)
        with torch.no_grad():
            r = torch.softmax(u.detach().float(), dim=1)
            g_norm = (torch.softmax(z.detach().float(), dim=1) - r).norm(dim=1)
            self.store.stage("limit_q_prob", batch.index, r)
            self.store.stage("limit_grad_norm", batch.index, g_norm)
        return StepResult((carrier + q_loss).detach(), z.detach())

    def load_rng_state_dict(self, state: dict[str, Any]) -> None:
        # Checkpoints before keyed noise held a per-rank generator ("noise_gen"): nothing to
        # restore now, the draws depend on the position alone.
        del state

    def label_issue_scores(
        self,
        given: np.ndarray,
        probs: np.ndarray,
        loss_history: np.ndarray,
        fields: Mapping[str, torch.Tensor],
    ) -> tuple[np.ndarray, np.ndarray]:
        r = fields["limit_q_prob"].float().numpy()
        return 1.0 - r[np.arange(len(given)), given], r.argmax(axis=1)
