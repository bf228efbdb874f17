"""``matbalora`` command line: a thin layer over the Python API.

Options of ``train`` are derived from the config dataclasses, so defaults cannot drift.
Errors in inputs become one line on stderr (``error: ...``), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any, Literal, get_args, get_origin

from matbalora import __version__
from matbalora.backbones import BACKBONES, DEFAULT_BACKBONE
from matbalora.config import AdapterConfig, HeadConfig, TrainConfig
from matbalora.defaults import LEVEL, SAMPLES

#: Every command's --help shows each option's default.
DEFAULTS_SHOWN = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "", skip: tuple[str, ...] = (), rename: dict[str, str] | None = None) -> None:
    rename = rename or {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in hints.items():
        if name in skip:
            continue
        flag = "--" + rename.get(name, prefix + name).replace("_", "-")
        dest = f"{cls.__name__}.{name}"
        help_text = f.metadata.get("help", "") or name.replace("_", " ")  # the default is shown by DEFAULTS_SHOWN
        ftype = f.type if not isinstance(f.type, str) else eval(f.type, vars(sys.modules[cls.__module__]))  # noqa: S307 - annotations of our own module
        if get_origin(ftype) is Literal:
            parser.add_argument(flag, dest=dest, choices=list(get_args(ftype)), default=f.default, help=help_text)
        elif ftype is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif ftype in (int, float, str):
            parser.add_argument(flag, dest=dest, type=ftype, default=f.default, help=help_text)
        elif get_origin(ftype) is tuple:
            parser.add_argument(flag, dest=dest, nargs="+", default=list(f.default), help=help_text)


def _collect(args: argparse.Namespace, cls: type, **overrides: Any) -> Any:
    kwargs = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith(cls.__name__ + ".")}
    kwargs.update(overrides)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})


def _train_parser(sub) -> None:
    p = sub.add_parser("train", **DEFAULTS_SHOWN, help="fine-tune a band-gap model (or an ensemble) on a data file")
    p.add_argument("--data", required=True, help="extxyz(.gz), a CIF/POSCAR folder with id,band_gap CSV, or pymatgen JSON")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--resume", action="store_true", help="continue from the folder's last checkpoint")
    p.add_argument("--members", type=int, default=1, help="train an ensemble of this many models (different seeds)")
    p.add_argument("--max-structures", type=int, default=None, help="use only the first N structures")
    p.add_argument("--split", choices=["random", "grouped"], default="random", help="random or composition-grouped split")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of the data for validation")
    p.add_argument("--test-fraction", type=float, default=0.1, help="fraction of the data for the test")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the split")
    p.add_argument("--samples", type=int, default=SAMPLES, help="Monte-Carlo samples for calibration and test metrics")
    p.add_argument("--cache", default=None, help="graph cache folder (default: $MATBALORA_CACHE or ~/.cache/matbalora)")
    p.add_argument("--workers", type=int, default=1, help="processes for graph conversion")
    p.add_argument("--backbone", choices=list(BACKBONES), default=DEFAULT_BACKBONE, help="pretrained backbone family")
    p.add_argument("--backbone-checkpoint", default=None, help="a checkpoint file of that family (default: the one its wheel ships, e.g. CHGNet 0.3.0, SevenNet-0)")
    _add_dataclass_options(p, TrainConfig)
    _add_dataclass_options(p, AdapterConfig, skip=("bayesian",), rename={"dropout": "adapter_dropout"})
    _add_dataclass_options(p, HeadConfig, prefix="head_", rename={"loss": "loss"})
    for action in p._actions:  # no --targets: the backbone family's own (Backbone.default_targets)
        if action.dest == "AdapterConfig.targets":
            action.default, action.help = None, f"{action.help}; none given: the --backbone family's default targets"


def _cmd_train(args: argparse.Namespace) -> int:
    from matbalora.finetune import DataSpec, train_ensemble, train_model

    train = _collect(args, TrainConfig)
    adapter = None
    if train.method in ("lora", "balora"):
        from matbalora.backbones import get_backbone

        given = getattr(args, "AdapterConfig.targets")
        targets = tuple(given) if given is not None else tuple(get_backbone(args.backbone).default_targets)
        adapter = _collect(args, AdapterConfig, bayesian=train.method == "balora", targets=targets)
    head = _collect(args, HeadConfig)
    spec = DataSpec(args.data, args.max_structures, args.split, args.val_fraction, args.test_fraction, args.split_seed)
    common = dict(train=train, adapter=adapter, head=head, resume=args.resume, cache_dir=args.cache, samples=args.samples, workers=args.workers, backbone=args.backbone, backbone_checkpoint=args.backbone_checkpoint)
    if args.members > 1:
        out = train_ensemble(spec, args.out, members=args.members, **common)
    else:
        out = train_model(spec, args.out, **common)
    print(f"wrote {out}")
    return 0


ORDER_HELP = "predict a disordered structure as an ordered approximant (pymatgen's OrderDisorderedStructureTransformation), said in the note column"
WINDOW_HELP = "add a p_window column: the probability that the gap lies in [LO, HI] eV (LO = 0 counts metals; HI may be inf)"


def _window(args: argparse.Namespace) -> tuple[float, float] | None:
    if args.window is None:
        return None
    from matbalora.probabilities import check_window

    return check_window(args.window)


def _predict_parser(sub) -> None:
    p = sub.add_parser("predict", **DEFAULTS_SHOWN, help="predict band gaps with uncertainty for structure files or folders")
    p.add_argument("paths", nargs="+", help="CIF, POSCAR/CONTCAR, extxyz or pymatgen JSON files, or folders")
    p.add_argument("--model", default=None, help="model folder (default: shipped BaLoRA model)")
    p.add_argument("--ensemble", default=None, nargs="?", const="", help="also predict with a deep ensemble (default folder if no value)")
    p.add_argument("--samples", type=int, default=SAMPLES, help="Monte-Carlo samples (0: posterior mean only)")
    p.add_argument("--level", type=float, default=LEVEL, help="central interval level")
    p.add_argument("--out", default=None, help="write .csv or .json (atomically) instead of a table on stdout")
    p.add_argument("--strict", action="store_true", help="stop at the first rejected input")
    p.add_argument("--order", action="store_true", help=ORDER_HELP)
    p.add_argument("--window", type=float, nargs=2, metavar=("LO", "HI"), default=None, help=WINDOW_HELP)


def _cmd_predict(args: argparse.Namespace) -> int:
    from matbalora.screening import predict_paths, write_table

    frame, rejected = predict_paths(
        args.paths, model=args.model, ensemble=(args.ensemble or True) if args.ensemble is not None else False,
        samples=args.samples, level=args.level, strict=args.strict, order=args.order, window=_window(args),
    )
    from matbalora.data.formats import escape

    for path, reason in rejected:
        print(f"error: {escape(path)}: {escape(reason)}", file=sys.stderr)  # one line each, whatever the names hold
    if args.strict and rejected:
        return 1
    if args.out:
        write_table(frame, args.out)
    elif len(frame):
        import pandas as pd

        with pd.option_context("display.max_rows", None, "display.width", 160, "display.float_format", "{:.3f}".format):
            print(frame.drop(columns=[c for c in ("error", "std_epistemic", "std_aleatoric", "note", "warning") if c in frame]).to_string(index=False))
        for sid, text in [(i, f"{n} {w}".strip()) for i, n, w in zip(frame["id"], frame["note"], frame["warning"])]:
            if text:
                print(f"note: {sid}: {text}", file=sys.stderr)
    return 1 if rejected else 0


def _screen_parser(sub) -> None:
    p = sub.add_parser("screen", **DEFAULTS_SHOWN, help="screen many structures in chunks into a resumable CSV, here or on a Dask cluster")
    p.add_argument("paths", nargs="+", help="CIF, POSCAR/CONTCAR, extxyz or pymatgen JSON files, or folders")
    p.add_argument("--out", required=True, help="CSV to append finished chunks to; rerun to resume")
    p.add_argument("--model", default=None, help="model folder (default: shipped BaLoRA model)")
    p.add_argument("--ensemble", default=None, nargs="?", const="", help="also predict with a deep ensemble (default folder if no value)")
    p.add_argument("--samples", type=int, default=SAMPLES, help="Monte-Carlo samples (0: posterior mean only)")
    p.add_argument("--level", type=float, default=LEVEL, help="central interval level")
    p.add_argument("--batch-size", type=int, default=256, help="crystals per chunk (one task on a cluster)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the Monte-Carlo draws (with the crystal, it fixes every draw)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS", help="Dask scheduler address, e.g. tcp://host:8786 (default: this process)")
    p.add_argument("--retries", type=int, default=2, help="reruns of a chunk whose task failed (with --scheduler)")
    p.add_argument("--max-atoms", type=int, default=None, help="reject larger structures (default: the data layer's limit)")
    p.add_argument("--order", action="store_true", help=ORDER_HELP)
    p.add_argument("--window", type=float, nargs=2, metavar=("LO", "HI"), default=None, help=WINDOW_HELP)
    p.add_argument("--top", type=int, default=None, metavar="N", help="print the N rows of highest p_window (needs --window; --out keeps every row)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_screen(args: argparse.Namespace) -> int:
    from matbalora.screening import screen, top_by_window

    window = _window(args)
    if args.top is not None and (window is None or args.top < 1):
        raise ValueError(f"--top {args.top} needs --window LO HI and N >= 1")
    ensemble = (args.ensemble or True) if args.ensemble is not None else None
    frame = screen(
        args.paths, model=args.model, ensemble=ensemble, samples=args.samples, level=args.level,
        batch_size=args.batch_size, out=args.out, progress=not args.no_progress, seed=args.seed,
        cluster=args.scheduler, retries=args.retries, order=args.order, window=window,
        **({} if args.max_atoms is None else {"max_atoms": args.max_atoms}),
    )
    failed = int((frame["error"] != "").sum()) if len(frame) else 0
    print(f"wrote {args.out}: {len(frame)} rows, {failed} rejected (see the error column)")
    if args.top is not None:
        import pandas as pd

        best = top_by_window(frame, args.top)
        shown = [c for c in ("id", "formula", "band_gap", "std", "lower", "upper", "p_metal", "p_window") if c in best]
        print(f"top {len(best)} by P({window[0]:g} eV <= gap <= {window[1]:g} eV):")
        with pd.option_context("display.max_rows", None, "display.width", 160, "display.float_format", "{:.3f}".format):
            print(best[shown].to_string(index=False))
    return 0


def _data_parser(sub) -> None:
    p = sub.add_parser("data", **DEFAULTS_SHOWN, help="inspect band-gap data")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    info = dsub.add_parser("info", **DEFAULTS_SHOWN, help="counts, metal fraction, gap statistics, atom counts, elements")
    info.add_argument("path", help="a data file or folder")
    info.add_argument("--max-structures", type=int, default=None, help="read only the first N structures (default: all)")


def _cmd_data(args: argparse.Namespace) -> int:
    from matbalora.data.info import format_summary, summarize
    from matbalora.data.readers import load_dataset

    ds = load_dataset(args.path, on_invalid="skip", max_structures=args.max_structures)
    print(format_summary(summarize(ds)))
    return 0


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", **DEFAULTS_SHOWN, help="metrics, recalibrated coverage and plots on labelled data")
    p.add_argument("--model", default=None, help="model folder (default: shipped BaLoRA model)")
    p.add_argument("--ensemble", default=None, nargs="?", const="", help="also evaluate a deep ensemble (default folder if no value)")
    p.add_argument("--data", required=True, help="labelled data (extxyz, folder + CSV, pymatgen JSON)")
    p.add_argument("--samples", type=int, default=SAMPLES, help="Monte-Carlo samples")
    p.add_argument("--level", type=float, default=LEVEL, help="central interval level")
    p.add_argument("--max-structures", type=int, default=None, help="use only the first N structures")
    p.add_argument("--out", required=True, help="folder for metrics.json, predictions.csv and plots")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from matbalora.api import load_ensemble, load_model
    from matbalora.evaluation import evaluate_on_data

    ensemble = load_ensemble(args.ensemble or None) if args.ensemble is not None else None
    report = evaluate_on_data(args.data, args.out, model=load_model(args.model), ensemble=ensemble, samples=args.samples, level=args.level, max_structures=args.max_structures)
    summary = {name: report[name].get("calibrated", {}) for name in ("model", "ensemble") if name in report}
    print(json.dumps({k: {m: v.get(m) for m in ("mae", "spearman", "coverage_90", "nonmetal_mae", "nonmetal_spearman")} for k, v in summary.items()}, indent=1))
    print(f"wrote {args.out}/metrics.json")
    return 0


def _app_parser(sub) -> None:
    p = sub.add_parser("app", help="serve the Streamlit web app on the shipped models (matbalora app --help for options)", add_help=False)
    p.add_argument("streamlit_args", nargs=argparse.REMAINDER, help="options of the app launcher")


def _cmd_app(args: argparse.Namespace) -> int:
    from matbalora.app.launcher import launch

    return int(launch(args.streamlit_args) or 0)


COMMANDS = {"train": _cmd_train, "predict": _cmd_predict, "screen": _cmd_screen, "data": _cmd_data, "evaluate": _cmd_evaluate, "app": _cmd_app}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="matbalora", description="Band gaps with BaLoRA uncertainty on pretrained CHGNet")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"matbalora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _predict_parser(sub)
    _screen_parser(sub)
    _data_parser(sub)
    _evaluate_parser(sub)
    _app_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    k = argv.index("app") if "app" in argv else -1
    if k >= 0 and all(a in ("-v", "--verbose") for a in argv[:k]):
        # everything after `app` is the launcher's (--models, --port, ... and streamlit's own options);
        # argparse's REMAINDER would refuse a first one that starts with "--"
        args = build_parser().parse_args(argv[:k + 1])
        args.streamlit_args = argv[k + 1:]
    else:
        args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from matbalora.allocator import tune_cpu_allocator

    tune_cpu_allocator()  # a process-wide setting: the command line owns its process
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, RuntimeError, ImportError, OSError) as exc:
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
