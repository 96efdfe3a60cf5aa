"""Train a dual-neck autoencoder (or plain autoencoder) and its classifier on MNIST.

    python train/dna_mnist.py --model dna --run-dir runs/dna_mnist              # both stages
    python train/dna_mnist.py --model ae --run-dir runs/ae_mnist
    python train/dna_mnist.py --stage 2 --from runs/dna_mnist/stage1 --run-dir runs/dna_mnist_clf
    accelerate launch train/dna_mnist.py ...                                     # N processes
Defaults are the paper's MNIST hyperparameters (SPEC section 6): batch 500, Adam 5e-4, 40 epochs,
lambda 0.05; the classifier (our choice): Adam 1e-3, batch 100, 10 epochs on both reconstructions.
"""

from __future__ import annotations

from decorr.errors import cli_entry
from dna.cli import main as train_main


@cli_entry
def main(argv: list[str] | None = None) -> None:
    train_main("mnist", argv, description=__doc__)


if __name__ == "__main__":
    main()
