"""Train a dual-neck autoencoder (or plain autoencoder) and its classifier on CIFAR-10.

    python train/dna_cifar.py --model dna --run-dir runs/dna_cifar
    accelerate launch -q --num_processes 4 train/dna_cifar.py --mixed-precision bf16 --run-dir ...   # BN over the global batch
    python train/dna_cifar.py --dataset ../shared/data/cifar10-subset/cifar10_subset.npz --run-dir ...
Defaults are the paper's CIFAR-10 hyperparameters (SPEC section 6): batch 1250, Adam 5e-4, 30 epochs,
lambda 0.05, random crop (pad 4) and horizontal flip; the classifier (our choice): Adam 1e-3, batch 250,
30 epochs.
"""

from __future__ import annotations

from decorr.errors import cli_entry
from dna.cli import main as train_main


@cli_entry
def main(argv: list[str] | None = None) -> None:
    train_main("cifar", argv, description=__doc__)


if __name__ == "__main__":
    main()
