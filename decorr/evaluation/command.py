"""One transfer evaluation as a whole job: which models, which data, how to attack, where the results go.

``eval/transfer.py`` parses its flags into a :class:`TransferJob` and calls :func:`run_transfer_job`; a
sweep (``eval/sweep.py``) runs one job per cell. Every refusal happens before any work (outputs that
would overwrite an input, a folder below a file, bad settings, a split smaller than ``--num-samples``);
the results are written into a staging folder that replaces ``--out`` only on success.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from decorr.attacks import add_attack_arguments, attack_overrides
from decorr.config import (add_config_arguments, add_config_file_argument, check_subset, config_kwargs, opt,
                           parse_with_config, resolve_device)
from decorr.data import load_dataset
from decorr.distributed import barrier, broadcast_object, rank, start_processes
from decorr.errors import DecorrError
from decorr.evaluation.ensembles import ENSEMBLE_RULES
from decorr.evaluation.adversarial_files import AdversarialWriter, evaluate_adversarial_specs, read_index
from decorr.evaluation.presets import PRESETS, apply_preset, preset_record
from decorr.evaluation.progress import terminal_reporter
from decorr.evaluation.report import format_transfer, save_transfer_report
from decorr.evaluation.options import Reporter, TransferOptions, default_eps_text
from decorr.evaluation.selection import ModelSelection, checkpoint_dataset, evaluate_checkpoints
from decorr.io import check_paths_apart, default_output_dir, prepare_output_dir, staged_output_dir
from decorr.specs import SPEC_HELP, add_spec_arguments, spec_options, spec_paths

__all__ = ["DataOptions", "OutputOptions", "TransferJob", "describe_job", "evaluate_job", "job_from_args", "jsonable_job",
           "parse_transfer_args", "run_transfer_job", "transfer_parser"]


@dataclass(frozen=True)
class DataOptions:
    """The evaluated images: a dataset (name, .npz, image folder or labels .csv) and how folders are read."""

    dataset: str | None = opt(None, "dataset name, .npz, or image folder / labels .csv (default: the checkpoints' "
                                    "dataset)")
    data_root: str | None = opt(None, "folder holding the dataset files (else $DECORR_DATA_ROOT)")
    num_samples: int | None = opt(None, "first N test images (default: all)")
    image_size: int | None = opt(None, "folder images: resize (shorter side) and centre-crop to N x N, as "
                                       "torchvision's Resize + CenterCrop", metavar="N")
    resize: int | None = opt(None, "with --image-size: resize the shorter side to R before the N x N crop (e.g. 256 "
                                   "for 224)", metavar="R")
    class_map: str | None = opt(None, "folder labels: JSON or text file mapping label names to indices")
    label_offset: int = opt(0, "added to a labels .csv's integer labels (NIPS 2017: -1)")
    memory_budget_mb: float | None = opt(None, "decoded folder images up to this size stay in memory, larger sets "
                                               "are streamed (default 4096)")
    workers: int | None = opt(None, "DataLoader workers decoding streamed images")

    def __post_init__(self) -> None:
        check_subset("num_samples", self.num_samples)

    def folder_options(self) -> dict[str, Any]:
        return {k: v for k, v in dict(image_size=self.image_size, resize=self.resize, class_map=self.class_map,
                                      label_offset=self.label_offset, memory_budget_mb=self.memory_budget_mb,
                                      workers=self.workers).items() if v not in (None, 0)}


@dataclass(frozen=True)
class OutputOptions:
    """Where the results go, and the adversarial examples as files (written or read back)."""

    out: str | None = opt(None, "output folder (default: runs/eval/<timestamp>)")
    overwrite: bool = opt(False, "replace the results in an existing --out")
    no_plots: bool = opt(False, "write no PNG plots")
    tensorboard: bool = opt(False, "also write TensorBoard scalars to OUT/tensorboard")
    save_adversarial: str | None = opt(None, "write every source's adversarial examples per attack and eps as PNG "
                                             "(round(255 x)) + DIR/index.csv", metavar="DIR")
    save_float: bool = opt(False, "with --save-adversarial: also a float32 .npy per image")
    adversarial: str | None = opt(None, "evaluate the targets (and named --surrogate sources) on the saved examples "
                                        "in DIR; no attack", metavar="DIR")
    adversarial_float: bool = opt(False, "with --adversarial: evaluate the float copies (8-bit results beside them)")
    quiet: bool = opt(False, "print no progress (errors and the final tables only)")


@dataclass(frozen=True)
class TransferJob:
    """Everything one evaluation needs; ``asdict`` of it is the resolved configuration written beside the results."""

    selection: ModelSelection
    data: DataOptions = field(default_factory=DataOptions)
    options: TransferOptions = field(default_factory=TransferOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    device: str | None = None
    command: tuple[str, ...] = ()
    #: the --preset protocol this job fills in (decorr.evaluation.presets.preset_record), or None
    preset: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        output = self.output
        if output.adversarial and output.save_adversarial:
            raise DecorrError("--adversarial evaluates saved examples and --save-adversarial saves new ones; use one")
        if output.save_float and not output.save_adversarial:
            raise DecorrError("--save-float needs --save-adversarial DIR")
        if output.adversarial_float and not output.adversarial:
            raise DecorrError("--adversarial-float needs --adversarial DIR")

    def input_paths(self) -> dict[str, str]:
        """Every existing file or folder this job reads, by the text that named it."""
        selection, data = self.selection, self.data
        paths = spec_paths(list(selection.targets + selection.surrogates) + selection.member_specs)
        for flag, value in (("dataset", data.dataset), ("adversarial", self.output.adversarial),
                            ("class_map", data.class_map)):
            if value and os.path.exists(value):
                paths[f"--{flag.replace('_', '-')} {value}"] = value
        return paths


def transfer_parser(description: str | None = None) -> argparse.ArgumentParser:
    """``eval/transfer.py``'s flags: the models, then one option per field of :class:`TransferOptions`,
    :class:`DataOptions`, :class:`OutputOptions` and of every attack component, and the spec options."""
    p = argparse.ArgumentParser(description=description, epilog=SPEC_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", metavar="SPEC", help="target models: checkpoints or ARCH=WEIGHTS specs")
    p.add_argument("--ensemble", action="append", default=[], metavar="NAME=SPEC,SPEC",
                   help="a target that combines its members (repeatable); attacked white-box like every target")
    p.add_argument("--ensemble-rule", choices=ENSEMBLE_RULES, default="prob",
                   help="ensembles predict with the mean softmax (prob), the mean logits or a majority vote")
    p.add_argument("--surrogate-ensemble", action="append", default=[], metavar="NAME=SPEC,SPEC",
                   help="a source attacked on its members' mean loss (Liu et al. 2017; repeatable)")
    p.add_argument("--surrogate", nargs="+", default=[], metavar="SPEC",
                   help="source-only models whose adversarial examples are evaluated on every target")
    p.add_argument("--members-per-device", default=None, metavar="N|auto",
                   help="ensembles too large for one GPU: N members on each visible GPU (auto: as evenly as possible)")
    add_config_arguments(p, TransferOptions, exclude=("attack_settings",))
    add_config_arguments(p.add_argument_group("data"), DataOptions)
    add_config_arguments(p.add_argument_group("outputs and adversarial files (docs/transfer.md)"), OutputOptions)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; each process its GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (e.g. 1 on a shared machine)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="a published protocol's settings (decorr.evaluation.presets); a --config file and explicit "
                        "flags override them; --dry-run prints the whole protocol")
    p.add_argument("--dry-run", action="store_true", help="print the resolved job (models, data, attacks with their "
                                                          "settings, eps) and stop; nothing is loaded or written")
    add_config_file_argument(p)
    add_attack_arguments(p)
    add_spec_arguments(p)
    return p


def parse_transfer_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser``'s arguments with ``--preset`` (its settings the defaults, below a ``--config`` file and explicit
    flags); the preset's record goes to ``args.preset_record``."""
    first, _ = parser.parse_known_args(argv)
    applied = apply_preset(parser, first.preset) if getattr(first, "preset", None) else None
    args = parse_with_config(parser, argv)
    args.preset_record = preset_record(getattr(first, "preset", None), applied, args)
    return args


def job_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> TransferJob:
    """The :class:`TransferJob` the flags describe (every setting checked here, before any work)."""
    if getattr(args, "preset", None) and getattr(args, "preset_record", None) is None:
        raise DecorrError(f"preset {args.preset} was not applied (only eval/transfer.py's command line applies "
                          "--preset); give the protocol's settings themselves (see --preset ... --dry-run)")
    selection = ModelSelection(targets=tuple(args.checkpoints), surrogates=tuple(args.surrogate),
                               ensembles=tuple(args.ensemble), surrogate_ensembles=tuple(args.surrogate_ensemble),
                               ensemble_rule=args.ensemble_rule, spec_options=spec_options(args),
                               members_per_device=args.members_per_device)
    options = TransferOptions(**config_kwargs(TransferOptions, args, exclude=("attack_settings",)),
                              attack_settings=attack_overrides(args))
    return TransferJob(selection, DataOptions(**config_kwargs(DataOptions, args)), options,
                       OutputOptions(**config_kwargs(OutputOptions, args)), device=args.device,
                       command=tuple(sys.argv[1:] if argv is None else argv),
                       preset=getattr(args, "preset_record", None))


def describe_job(job: TransferJob) -> str:
    """The resolved job as readable JSON (``--dry-run``): every attack with all its settings."""
    record = jsonable_job(job)
    record["options"]["attacks"] = [a.describe() for a in job.options.parsed_attacks()]
    return json.dumps(record, indent=2, default=str)


def run_transfer_job(job: TransferJob) -> dict[str, Any]:
    """Evaluate, print the tables, write ``--out`` (results.json, CSVs, tables, plots) and return the result."""
    device = start_processes(resolve_device(job.device))
    output = job.output
    # one folder for every process (a default one is named by the time, which processes would not agree on)
    chosen = broadcast_object(str(output.out or default_output_dir()))
    out = prepare_output_dir(chosen, overwrite=output.overwrite)  # before any work
    # --out is replaced whole when the results are written: it may hold neither an input nor the examples
    # that --save-adversarial writes during the same run.
    check_paths_apart({"--out": out, "--save-adversarial": output.save_adversarial}, job.input_paths())
    result = evaluate_job(job, device, terminal_reporter(quiet=output.quiet))
    if rank() == 0:
        with staged_output_dir(out, overwrite=output.overwrite) as staging:
            save_transfer_report(result, staging, plots=not output.no_plots, tensorboard=output.tensorboard)
        print(format_transfer(result))
        print(f"\nwrote {out}/results.json, transfer.csv, pairs.csv, table.txt" + ("" if output.no_plots else
                                                                                    " and plots"))
    return result


def evaluate_job(job: TransferJob, device: Any, report: Reporter) -> dict[str, Any]:
    """The job's result (every process gets it whole), without writing ``--out``."""
    if job.output.adversarial:
        result = _evaluate_folder(job, device, report.say)
    else:
        result = _evaluate_attacks(job, device, report)
    result["settings"].update({"device": str(device), "command": list(job.command)})
    result["config"] = jsonable_job(job)
    return result


def _evaluate_attacks(job: TransferJob, device: Any, report: Any) -> dict[str, Any]:
    selection, data, output = job.selection, job.data, job.output
    writer = AdversarialWriter(output.save_adversarial, save_float=output.save_float) if output.save_adversarial \
        else None  # checks the folder now; it is created with the first adversarial batch
    barrier()  # every process has checked the folder before any writes into it
    dataset = load_dataset(data.dataset or checkpoint_dataset(list(selection.targets + selection.surrogates)
                                                              + selection.member_specs),
                           data.data_root, **data.folder_options())
    split = dataset.test
    if data.num_samples is not None:
        if data.num_samples > len(split):
            raise DecorrError(f"--num-samples {data.num_samples} is more than the {len(split)} test images of "
                              f"{dataset.name}; pass at most {len(split)}, or leave it out to evaluate them all")
        split = split.subset(data.num_samples)
    try:
        result = evaluate_checkpoints(selection, split, job.options, device=device, report=report,
                                      on_adversarial=writer)
    except BaseException:
        if writer is not None:
            writer.discard()  # no half-written folder
        raise
    result["settings"]["eps_default"] = None
    if not job.options.eps:  # printed with the tables' notes
        described = default_eps_text(tuple(dataset.input_shape))
        result["settings"]["eps_default"] = described
        result["notes"] = sorted([*result["notes"], f"no --eps given: the default radii for {described}"])
    result["settings"]["dataset"] = dataset.name
    if writer is not None:
        writer.close(result["settings"])
        result["settings"]["save_adversarial"] = str(output.save_adversarial)
    return result


def _evaluate_folder(job: TransferJob, device: Any, say: Any) -> dict[str, Any]:
    selection, output = job.selection, job.output
    if selection.ensembles or selection.surrogate_ensembles:
        raise DecorrError("--adversarial evaluates single models on saved examples; drop --ensemble/--surrogate-ensemble")
    if job.data.num_samples is not None:
        raise DecorrError("--adversarial evaluates every image its index.csv lists; drop --num-samples")
    eps = job.options.eps
    if eps:
        listed = sorted({e for _, _, e in read_index(output.adversarial)})
        if len(listed) != len(eps) or not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
                                              for a, b in zip(listed, sorted(eps))):
            raise DecorrError(f"--adversarial {output.adversarial} holds the radii {' '.join(f'{e:g}' for e in listed)}, "
                              f"not --eps {' '.join(f'{e:g}' for e in eps)}; drop --eps (the folder's radii are "
                              "evaluated)")
    result = evaluate_adversarial_specs(
        list(selection.targets), output.adversarial, surrogates=list(selection.surrogates), device=device,
        spec_options=selection.spec_options, use_float=output.adversarial_float, batch_size=job.options.batch_size,
        log=say, memory_budget_mb=job.data.memory_budget_mb, workers=job.data.workers)
    result["settings"]["dataset"] = None
    return result


def jsonable_job(job: TransferJob) -> dict[str, Any]:
    record = asdict(job)
    spec_options = job.selection.spec_options
    record["selection"]["spec_options"] = None if spec_options is None else asdict(spec_options)
    return record
