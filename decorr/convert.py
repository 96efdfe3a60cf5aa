"""Write any model spec as a decorr checkpoint (kind ``converted``).

    python -m decorr.convert torchvision.resnet18=r18.pth --num-classes 10 --mean 0.485 0.456 0.406 \
        --std 0.229 0.224 0.225 --input-size 224 --dataset cifar10 --out runs/r18
    python -m decorr.convert resnet20=paper_r20.pth --match-by-order --out runs/paper_r20
The checkpoint holds one model ``model0`` per ``ARCH=WEIGHTS`` spec (a checkpoint spec keeps its models'
names) and records the spec, the weights file and its sha256 under ``source``. Registry architectures
rebuild from the registry; torchvision/timm ones from their entry ``arch: "torchvision.NAME"`` (with
``preprocess`` for mean/std/input size), so every tool that takes a checkpoint takes the result.
An existing --out is never overwritten; --dataset must name a dataset that exists (a registered name, a .npz
file or an image folder), since every evaluation of the checkpoint defaults to it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from decorr.config import parse_with_config
from decorr.checkpoint import save_checkpoint
from decorr.errors import DecorrError, cli_entry
from decorr.io import blocking_file
from decorr.specs import SPEC_HELP, SpecOptions, add_spec_arguments, load_specs, spec_options

__all__ = ["convert_spec", "main"]


def convert_spec(spec: str, out: str | Path, options: SpecOptions | None = None, *,
                 dataset: str | None = None) -> Path:
    """Load ``spec`` (``decorr.specs``) and save its models as a checkpoint in ``out``."""
    out = Path(out)
    blocker = blocking_file(out)
    if blocker is not None:
        raise DecorrError(f"--out {out} lies below {blocker}, which is a file, not a folder; choose another --out")
    if out.exists() or out.with_name(out.name + ".tmp").exists():
        raise DecorrError(f"{out} already exists; choose another --out (a conversion never overwrites)")
    if dataset is not None:
        from decorr.data import check_dataset_name

        check_dataset_name(dataset)
    loaded = load_specs([spec], options)
    models: dict[str, Any] = {}
    entries: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, Any]] = {}
    for full_name, model in loaded.items():
        name = full_name.rsplit("/", 1)[1] if "checkpoint" in model.info else f"model{len(models)}"
        models[name] = model.module
        entries[name] = dict(model.entry)
        sources[name] = dict(model.info)
    dataset = dataset or next((s.get("dataset") for s in sources.values() if s.get("dataset")), None)
    return save_checkpoint(out, models, {"kind": "converted", "models": entries, "dataset": dataset,
                                         "epoch": None, "source": sources})


@cli_entry
def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m decorr.convert", description=__doc__, epilog=SPEC_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", metavar="SPEC", help="the model to convert (ARCH=WEIGHTS[@KEY=VALUE,...] or a checkpoint)")
    p.add_argument("--out", required=True, help="the checkpoint directory to write (must not exist)")
    p.add_argument("--dataset", default=None, help="dataset name recorded in the checkpoint (evaluations default to it)")
    add_spec_arguments(p)
    args = parse_with_config(p, argv)
    path = convert_spec(args.spec, args.out, spec_options(args), dataset=args.dataset)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
