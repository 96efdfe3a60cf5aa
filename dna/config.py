"""The DNA / AE training settings (:class:`DnaConfig`) and the paper's defaults (SPEC section 6).

One dataclass validates every setting of both stages; ``train/dna_mnist.py`` and ``train/dna_cifar.py``
generate their flags from it (:mod:`dna.cli`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


from decorr.config import opt
from decorr.errors import DecorrError
from decorr.models import model_spec
from decorr.config import check_at_least, check_finite, check_positive, check_seed, check_subset

__all__ = ["FAMILIES", "MODEL_KINDS", "PAPER_DEFAULTS", "STAGE_DIRS", "DnaConfig"]

FAMILIES = ("mnist", "cifar")
MODEL_KINDS = ("dna", "ae")
STAGE_DIRS = {1: "stage1", 2: "stage2"}

#: The paper's hyperparameters (SPEC section 6) for stage 1, and our choice for stage 2, which the
#: paper does not give: Adam 1e-3 with batches of 100 (MNIST, 10 epochs) / 250 (CIFAR-10, 30 epochs)
#: images, i.e. 200 / 500 reconstructions per step.
PAPER_DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist": dict(dataset="mnist", epochs=40, batch_size=500, lr=5e-4,
                  classifier_epochs=10, classifier_batch_size=100, classifier_lr=1e-3),
    "cifar": dict(dataset="cifar10", epochs=30, batch_size=1250, lr=5e-4,
                  classifier_epochs=30, classifier_batch_size=250, classifier_lr=1e-3),
}


@dataclass
class DnaConfig:
    """Hyperparameters of a DNA / AE run. Use :meth:`paper` for the paper's setting of a family."""

    family: str = opt("mnist", "mnist or cifar (set by the script)", choices=FAMILIES)
    model: str = opt("dna", "dual-neck (dna) or plain autoencoder (ae)", choices=MODEL_KINDS)
    dataset: str = opt("mnist", "dataset name or path to an .npz")
    unshared: int = opt(2, "layers per path that are not shared (DNA only): 2 = the DNA, 6 = two autoencoders",
                        choices=(2, 4, 6))
    # stage 1: the autoencoder
    epochs: int = opt(40, "stage-1 epochs")
    batch_size: int = opt(500, "stage-1 global batch per optimiser step (all processes and accumulation steps)")
    lr: float = opt(5e-4, "stage-1 Adam learning rate")
    lambda_corr: float = opt(0.05, "weight of the correlation loss")
    # stage 2: the classifier on the reconstructions
    classifier_epochs: int = opt(10, "stage-2 epochs")
    classifier_batch_size: int = opt(100, "stage-2 global batch of images per optimiser step")
    classifier_lr: float = opt(1e-3, "stage-2 Adam learning rate")
    # both stages
    augment: bool = opt(True, "no training augmentation (default: the dataset's, CIFAR-10: random crop pad 4 + flip)")
    sync_bn: bool = opt(True, "batch norm over each process's shard only (default: over the global batch of all "
                              "processes, the paper's 1250-sample statistics on N GPUs; one process: plain batch norm)")
    gradient_accumulation_steps: int = opt(1, "split each batch into this many micro-batches (the correlation loss "
                                              "sees one micro-batch)")
    seed: int = opt(0, "seed of the initialisation and the batches")
    train_subset: int | None = opt(None, "use only the first N training images")
    test_subset: int | None = opt(None, "use only the first N test images")
    eval_batch_size: int = opt(1000, "batch size of the evaluation after every epoch")
    image_samples: int = opt(16, "test images whose reconstructions are logged to TensorBoard every epoch (0: none)")

    @classmethod
    def paper(cls, family: str, **overrides: Any) -> DnaConfig:
        """The paper's setting for ``family`` ("mnist" or "cifar"), with ``overrides`` applied."""
        if family not in PAPER_DEFAULTS:
            raise DecorrError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown DnaConfig fields: {sorted(unknown)}")
        return cls(**{"family": family, **PAPER_DEFAULTS[family], **overrides})

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise DecorrError(f"unknown family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        if self.model not in MODEL_KINDS:
            raise DecorrError(f"unknown model {self.model!r}; use --model dna (dual neck) or --model ae (plain)")
        if self.model == "ae" and self.unshared != 2:
            raise DecorrError("--unshared applies to the DNA only; drop it for --model ae")
        if self.unshared not in (2, 4, 6):
            raise DecorrError(f"--unshared {self.unshared} is not supported; use 2 (the DNA), 4, or 6")
        for name in ("epochs", "batch_size", "classifier_epochs", "classifier_batch_size",
                     "gradient_accumulation_steps", "eval_batch_size"):
            check_at_least(name, getattr(self, name), 1)
        check_at_least("image_samples", self.image_samples, 0)
        check_positive("lr", self.lr)
        check_positive("classifier_lr", self.classifier_lr)
        check_finite("lambda_corr", self.lambda_corr, minimum=0)
        check_seed(self.seed)
        check_subset("train_subset", self.train_subset)
        check_subset("test_subset", self.test_subset)
        k = self.gradient_accumulation_steps
        for name in ("batch_size", "classifier_batch_size"):
            if getattr(self, name) % k:
                raise DecorrError(
                    f"--{name.replace('_', '-')} {getattr(self, name)} is not divisible by "
                    f"--gradient-accumulation-steps {k}; the batch is split into {k} equal micro-batches"
                )

    # -- what gets built ---------------------------------------------------------------------------
    @property
    def autoencoder_arch(self) -> str:
        return f"{self.model}_{self.family}"

    @property
    def autoencoder_kwargs(self) -> dict[str, Any]:
        return {"unshared": self.unshared} if self.model == "dna" else {}

    @property
    def classifier_arch(self) -> str:
        return f"dna_classifier_{self.family}"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        shape = model_spec(self.autoencoder_arch).input_shape
        assert shape is not None
        return shape

    def micro_batch_size(self, stage: int) -> int:
        batch = self.batch_size if stage == 1 else self.classifier_batch_size
        return batch // self.gradient_accumulation_steps


