"""The dual-neck autoencoder (DNA): models, objectives and training."""

from dna.models import (
    DnaClassifierCifar,
    DnaClassifierMnist,
    DualNeckAutoencoder,
    forward_with_latents,
    latent_layers,
)
from dna.objectives import (
    adaptive_objective,
    autoencoder_loss,
    autoencoder_loss_from_errors,
    dna_accuracy,
    paper_objective,
    path_predictions,
    reconstruction_errors,
)

__all__ = [
    "DnaClassifierCifar",
    "DnaClassifierMnist",
    "DualNeckAutoencoder",
    "adaptive_objective",
    "autoencoder_loss",
    "autoencoder_loss_from_errors",
    "dna_accuracy",
    "forward_with_latents",
    "latent_layers",
    "paper_objective",
    "path_predictions",
    "reconstruction_errors",
]
