"""Robustness of the (dual-neck) autoencoder defence to white-box attacks (SPEC section 6).

The defended model is ``classifier(autoencoder(x))``. For each attack (FGSM, PGD), objective and
epsilon we craft adversarial examples against the whole pipeline and report, for the DNA, the
accuracy when *either* path's reconstruction is classified correctly (the defence's accuracy), each
path's accuracy and their mean, and for a baseline (the plain autoencoder) its accuracy under the
same attack against itself.

Objectives (the attack maximises them; see :mod:`dna.objectives`):

- ``paper``: P1's ``CE(C(r1), y)^2 + CE(C(r2), y)^2`` (one path: ``CE(C(r), y)``).
- ``adaptive-min``: the mean over samples of the smaller per-path CE; only rises when the path that
  is still correct is pushed.
- ``adaptive-margin``: per sample, the sum over paths of the CW margin capped at ``kappa``; the
  maximum is reached only when every path is fooled.

For one path ``adaptive-min`` is the paper's objective (the CE), so a single-path model is attacked
once for both. PGD takes ``steps`` steps of ``step_size`` (default ``2.5 * eps / steps``, Madry et al.:
enough to cross the ball 2.5 times) from a uniform random start, drawn from a generator seeded by
``(seed, batch index)`` so that a run is reproducible.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from decorr.attacks import Attack, Source, parse_attack
from decorr.checkpoint import load_checkpoint, load_models
from decorr.data import ImageSplit, epoch_generator
from decorr.evaluation.passes import batches, gather_rows
from decorr.config import check_at_least, check_finite, check_seed, opt
from decorr.errors import DecorrError, pixel_value
from decorr.evaluation.tables import eps_text
from decorr.evaluation.tables import format_table as report_table
from dna.objectives import adaptive_objective, dna_accuracy, paper_objective, path_predictions
from dna.training import resolve_dna_checkpoint

__all__ = [
    "ATTACKS",
    "OBJECTIVES",
    "WORST",
    "DefendedModel",
    "craft",
    "RobustnessOptions",
    "evaluate_robustness",
    "format_table",
    "load_defended_model",
    "plot_accuracy",
    "pgd_step_size",
    "plot_reconstructions",
    "worst_case_accuracy",
]

ATTACKS = ("fgsm", "pgd")
OBJECTIVES = ("paper", "adaptive-min", "adaptive-margin")
#: The objective name of the rows that take, per sample, the worst case over all objectives run.
WORST = "worst"


class DefendedModel:
    """An autoencoder and its classifier, in eval mode, with a name for tables and plots."""

    def __init__(self, autoencoder: nn.Module, classifier: nn.Module, name: str = "model",
                 source: str = "", info: Mapping[str, Any] | None = None) -> None:
        self.autoencoder = autoencoder.eval()
        self.classifier = classifier.eval()
        self.name = name
        self.source = source
        self.info = dict(info or {})

    @property
    def paths(self) -> int:
        return len(self.autoencoder.bottlenecks) if hasattr(self.autoencoder, "bottlenecks") else 1

    def to(self, device: torch.device | str) -> DefendedModel:
        self.autoencoder.to(device)
        self.classifier.to(device)
        return self


def load_defended_model(path: str | Path, device: torch.device | str = "cpu", name: str | None = None) -> DefendedModel:
    """The autoencoder and classifier of a stage-2 checkpoint (a run directory or checkpoint folder)."""
    directory = resolve_dna_checkpoint(path)
    models = load_models(directory, device)
    config = load_checkpoint(directory, load_weights=False).config
    entry = config["models"]["autoencoder"]
    info = {"arch": entry["arch"], "kwargs": entry.get("kwargs", {}), "dataset": config.get("dataset"),
            "epoch": config.get("epoch"), "metrics": config.get("metrics", {})}
    for param in [*models["autoencoder"].parameters(), *models["classifier"].parameters()]:
        param.requires_grad_(False)  # attacks need input gradients only
    if name is None:
        unshared = entry.get("kwargs", {}).get("unshared", 2)
        name = entry["arch"] + (f" (unshared {unshared})" if unshared != 2 else "")
    return DefendedModel(models["autoencoder"], models["classifier"], name, str(directory), info)


def _objective(model: DefendedModel, objective: str, kappa: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if objective == "paper":
        return paper_objective(model.autoencoder, model.classifier)
    if objective == "adaptive-min":
        return adaptive_objective(model.autoencoder, model.classifier, kind="min")
    if objective == "adaptive-margin":
        return adaptive_objective(model.autoencoder, model.classifier, kind="margin", kappa=kappa)
    raise DecorrError(f"unknown objective {objective!r}; choose from {', '.join(OBJECTIVES)}")


def _canonical_objective(objective: str, paths: int) -> str:
    # For one path the minimum over paths is that path's CE: the paper's objective exactly.
    return "paper" if paths == 1 and objective == "adaptive-min" else objective


def pgd_step_size(eps: float, steps: int, step_size: float | None) -> float:
    """The PGD step: ``step_size`` if given, else ``2.5 * eps / steps``."""
    return step_size if step_size is not None else 2.5 * eps / max(steps, 1)


@dataclass(frozen=True)
class RobustnessOptions:
    """What ``eval/dna_robustness.py`` runs (its flags, with the attack flags of the suite): attacks of the
    suite (each crafts on the objective as a loss closure: a DNA has no single logits to attack), objectives,
    epsilons, the margin objective's cap, batches and seed. PGD takes ``2.5 * eps / steps`` as its step
    unless ``--step-size`` (or ``pgd(step_size=...)``) says otherwise (Madry et al.: enough to cross the ball
    2.5 times)."""

    attacks: tuple[str, ...] = opt(ATTACKS, "attacks of the suite (as eval/transfer.py's --attack)", flag="--attack")
    objectives: tuple[str, ...] = opt(("paper", "adaptive-min"), "paper: sum of squared per-path CE (P1); "
                                      "adaptive-*: must fool every path", flag="--objective", choices=OBJECTIVES)
    eps: tuple[float, ...] = opt((), "Linf radii in pixel units (default MNIST 0.05 0.1 0.15, CIFAR-10 2/255 "
                                     "4/255 8/255)", type=pixel_value)
    kappa: float = opt(0.0, "cap of the per-path margin of adaptive-margin")
    batch_size: int = opt(500, "images per batch")
    seed: int = opt(0, "seeds the attacks' randomness (per batch)")
    attack_settings: dict[str, Any] = opt({}, "attack flags by name (not a flag: the attack flags set it)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "attacks", tuple(self.attacks))
        object.__setattr__(self, "objectives", tuple(self.objectives))
        object.__setattr__(self, "eps", tuple(float(e) for e in self.eps))
        for name in self.objectives:
            if name not in OBJECTIVES:
                raise DecorrError(f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}")
        if any(not 0 < e <= 1 for e in self.eps):
            raise DecorrError(f"epsilons are in pixel units (0, 1], got {list(self.eps)}")
        check_at_least("batch_size", self.batch_size, 1)
        check_seed(self.seed)
        check_finite("kappa", self.kappa, minimum=0)
        for name in self.attacks:  # every attack and setting checked before any work
            self.attack(name, 0.1).check_source(Source(loss_fn=lambda x, y: x.sum()))

    def attack(self, name: str, eps: float) -> Attack:
        """The attack ``name`` at radius ``eps``, PGD with its step rule (class docstring)."""
        attack = parse_attack(name, self.attack_settings)
        if attack.optimizer.name == "pgd" and "--step-size" not in self.attack_settings and "step_size" not in name:
            attack = parse_attack(name, {**self.attack_settings,
                                         "--step-size": pgd_step_size(eps, attack.optimizer.steps, None)})
        return attack


def craft(model: DefendedModel, x: torch.Tensor, y: torch.Tensor, *, attack: Attack, objective: str, eps: float,
          kappa: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial examples for ``x`` against ``model`` with one attack of the suite and one objective."""
    return attack.craft(Source(loss_fn=_objective(model, objective, kappa)), x, y, eps=eps, generator=generator)


def worst_case_accuracy(preds: Sequence[torch.Tensor], y: torch.Tensor) -> dict[str, float]:
    """Accuracies when a sample counts as correct only if it is correct under *every* attack in ``preds``
    (a list of per-path predictions [P, N], one per objective): the attack ensemble's accuracy."""
    correct = torch.stack([p == y[None, :] for p in preds])  # [objectives, P, N]
    per_path = correct.all(dim=0).float().mean(dim=1)
    result = {"either": correct.any(dim=1).all(dim=0).float().mean().item()}
    result.update({f"path{n}": acc.item() for n, acc in enumerate(per_path)})
    result["mean"] = per_path.mean().item()
    return result


def _device_of(model: DefendedModel) -> torch.device:
    return next(iter(model.classifier.parameters())).device


def evaluate_robustness(dna: DefendedModel, split: ImageSplit, options: RobustnessOptions = RobustnessOptions(), *,
                        baseline: DefendedModel | None = None,
                        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Accuracy of ``dna`` (and ``baseline``) on ``split``, clean and under every attack/objective/eps.

    Returns a plain dict (JSON-able): ``settings``, ``models`` and ``results``, a list of rows
    ``{"attack", "objective", "eps", "<model key>": accuracies}`` with a first row for clean data
    (attack "none", eps 0). The accuracies of a model are :func:`dna.objectives.dna_accuracy`'s
    fractions ("either", "path<n>", "mean"). Model keys are "dna" and "baseline". With more than one
    objective, each attack's block ends with rows of objective ``"worst"``: a sample is correct only
    if it is correct under every objective (:func:`worst_case_accuracy`).
    """
    eps = options.eps or (0.05, 0.10, 0.15)
    models = {"dna": dna, **({"baseline": baseline} if baseline is not None else {})}
    settings = [("none", "none", 0.0)] + [(a, o, float(e)) for a in options.attacks for o in options.objectives
                                          for e in eps]
    attacks = {(a, float(e)): options.attack(a, float(e)) for a in options.attacks for e in eps}
    started = time.perf_counter()
    stacked, y_all = _predictions(models, split, settings, attacks, options, progress, started)
    results = []
    for setting in settings:
        attack, objective, e = setting
        results.append({"attack": attack, "objective": objective, "eps": e,
                        **{k: dna_accuracy(stacked[k][setting], y_all) for k in models}})
        if len(options.objectives) > 1 and objective == options.objectives[-1] and e == float(eps[-1]):
            for e_worst in eps:  # after each attack's block: the per-sample worst case over its objectives
                runs = {k: [stacked[k][(attack, o, float(e_worst))] for o in options.objectives] for k in models}
                results.append({"attack": attack, "objective": WORST, "eps": float(e_worst),
                                **{k: worst_case_accuracy(runs[k], y_all) for k in models}})
    return {
        "settings": {
            "n": len(y_all), "attacks": list(options.attacks), "objectives": list(options.objectives),
            "eps": [float(e) for e in eps], "attack_settings": dict(options.attack_settings),
            "resolved": {f"{a} eps {e:g}": attack.describe() for (a, e), attack in attacks.items()},
            "margin_kappa": options.kappa, "batch_size": options.batch_size, "seed": options.seed,
            "seconds": round(time.perf_counter() - started, 1),
        },
        "models": {k: {"name": m.name, "source": m.source, "paths": m.paths, **m.info} for k, m in models.items()},
        "results": results,
    }


def _predictions(models: Mapping[str, DefendedModel], split: ImageSplit, settings: Sequence[tuple[str, str, float]],
                 attacks: Mapping[tuple[str, float], Attack], options: RobustnessOptions,
                 progress: Callable[[str], None] | None, started: float) -> tuple[dict[str, Any], torch.Tensor]:
    """Per model and setting, the per-path predictions [P, N] over the split; identical attacks crafted once."""
    preds: dict[str, dict[tuple[str, str, float], list[torch.Tensor]]] = {k: {s: [] for s in settings} for k in models}
    labels: list[torch.Tensor] = []
    positions: list[torch.Tensor] = []
    device = _device_of(next(iter(models.values())))
    # Whole batches per process (torchrun / accelerate launch); each batch's randomness keyed by its index.
    for batch in batches(split, options.batch_size, device):
        x, y, index = batch.x, batch.y, batch.index
        labels.append(y.cpu())
        positions.append(batch.positions)
        for key, model in models.items():
            done: dict[tuple[str, str, float], torch.Tensor] = {}
            for setting in settings:
                attack, objective, e = setting
                canonical = (attack, _canonical_objective(objective, model.paths), e)
                if canonical not in done:
                    x_eval = x if attack == "none" else craft(
                        model, x, y, attack=attacks[(attack, e)], objective=objective, eps=e, kappa=options.kappa,
                        generator=epoch_generator(options.seed, index))
                    done[canonical] = path_predictions(model.autoencoder, model.classifier, x_eval).cpu()
                preds[key][setting].append(done[canonical])
        if progress is not None:
            seen = sum(len(t) for t in labels)
            progress(f"{seen}/{len(split)} images, {time.perf_counter() - started:.0f} s")
    where = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)
    n = len(split)
    # predictions are [paths, images]: gathered by image (rows), then back
    stacked = {k: {s: gather_rows(where, torch.cat(p, dim=1).T, n).T for s, p in per_setting.items()}
               for k, per_setting in preds.items()}
    return stacked, gather_rows(where, torch.cat(labels), n)


# ------------------------------------------------------------------------------------------------
# Reporting


def format_table(report: Mapping[str, Any]) -> str:
    """The results as an aligned text table (accuracy in %)."""
    models = report["models"]
    paths = models["dna"]["paths"]
    header = ["attack", "objective", "eps", "either"] + [f"path{n}" for n in range(paths)] + ["mean"]
    if "baseline" in models:
        header.append(f"baseline ({models['baseline']['name']})")
    rows = []
    for row in report["results"]:
        acc = row["dna"]
        cells = [row["attack"], row["objective"], eps_text(row["eps"]), 100 * acc["either"]]
        cells += [100 * acc[f"path{n}"] for n in range(paths)] + [100 * acc["mean"]]
        if "baseline" in row:
            cells.append(100 * row["baseline"]["either"])
        rows.append(cells)
    title = f"accuracy (%) of {models['dna']['name']} on {report['settings']['n']} test images"
    return report_table(header, rows, title=title, float_format="{:.1f}", left_columns=2)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(report: Mapping[str, Any], path: str | Path) -> Path:
    """Accuracy against epsilon, one panel per attack (like P1's Fig. 6/8); epsilon 0 is clean data.

    Blue: the DNA's "either path" accuracy, red: the baseline's, green: the DNA's mean of paths (paper
    objective only). Line style: the objective (solid: the paper's; dash-dotted: the per-sample worst
    case over all objectives run).
    """
    plt = _plt()
    settings = report["settings"]
    attacks = settings["attacks"]
    objectives = list(settings["objectives"]) + ([WORST] if any(r["objective"] == WORST for r in report["results"]) else [])
    clean = report["results"][0]
    models = report["models"]
    styles = {"paper": "-", "adaptive-min": "--", "adaptive-margin": ":", WORST: "-."}
    fig, axes = plt.subplots(1, len(attacks), figsize=(5.6 * len(attacks), 4.4), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        for objective in objectives:
            rows = [clean] + [r for r in report["results"] if r["attack"] == attack and r["objective"] == objective]
            eps = [r["eps"] for r in rows]
            style = styles.get(objective, "-")
            ax.plot(eps, [100 * r["dna"]["either"] for r in rows], style, color="C0", marker="o", markersize=4,
                    label=f"{models['dna']['name']} either path ({objective})")
            if objective == "paper":
                ax.plot(eps, [100 * r["dna"]["mean"] for r in rows], style, color="C2", marker="s", markersize=3,
                        label=f"{models['dna']['name']} mean of paths ({objective})")
            if "baseline" in models:
                ax.plot(eps, [100 * r["baseline"]["either"] for r in rows], style, color="C3", marker="^",
                        markersize=4, label=f"{models['baseline']['name']} ({objective})")
        resolved = settings.get("resolved", {}).get(f"{attack} eps {max(settings['eps']):g}", {})
        steps = next(iter(resolved.get("components", {}).values()), {}).get("steps")
        ax.set_title(attack + (f", {steps} steps" if steps and steps > 1 else ""))
        ax.set_xlabel("epsilon (pixel units, L-inf)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@torch.no_grad()
def _reconstruct(model: DefendedModel, x: torch.Tensor) -> list[torch.Tensor]:
    return [r.detach().cpu() for r in model.autoencoder(x)]


def plot_reconstructions(
    model: DefendedModel,
    x: torch.Tensor,
    y: torch.Tensor,
    adversarial: Mapping[str, torch.Tensor],
    path: str | Path,
) -> Path:
    """Natural images, their reconstructions, and for each entry of ``adversarial`` (title -> x_adv)
    the perturbed images and their reconstructions (like P1's Fig. 7/9).

    One column per sample; the label above a reconstruction is the classifier's prediction (red when
    wrong).
    """
    plt = _plt()
    groups = [("natural", x.detach())] + [(title, adv.detach()) for title, adv in adversarial.items()]
    rows: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
    for title, images in groups:
        rows.append((title, images.cpu(), None))
        recons = _reconstruct(model, images)
        preds = path_predictions(model.autoencoder, model.classifier, images).cpu()
        for n, recon in enumerate(recons):
            rows.append((f"path {n} reconstruction" if len(recons) > 1 else "reconstruction", recon, preds[n]))
    n = x.shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n, 1.25 * len(rows)), squeeze=False)
    for r, (title, images, pred) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            image = images[c].clamp(0, 1).permute(1, 2, 0).numpy()
            ax.imshow(image[..., 0] if image.shape[2] == 1 else image, cmap="gray" if image.shape[2] == 1 else None,
                      vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if pred is not None:
                ok = int(pred[c]) == int(y[c])
                ax.set_title(str(int(pred[c])), fontsize=7, color="black" if ok else "red", pad=1)
        axes[r][0].set_ylabel(title.replace(" eps", "\neps"), fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.2)
    fig.subplots_adjust(left=0.14)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

