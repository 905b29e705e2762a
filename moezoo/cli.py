"""The ``moezoo`` command: LightningCLI (fit/validate/test/predict) plus ``moezoo zoo ...``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from moezoo.lightning_cli import MoezooCLI

__all__ = ["main"]

ROUTING_REPORT_HELP = ("Run a trained model over data and write a self-contained routing report (HTML with "
                       "embedded PNGs, the PNGs and a JSON of the numbers).")
ZOO_HELP = "Browse, evaluate, convert, export and release zoo entries."
#: What ``moezoo --help`` adds to LightningCLI's help: the commands dispatched before it.
OTHER_COMMANDS = (
    "Other commands: 'moezoo zoo {list,eval,convert,release,card,info,export}': " + ZOO_HELP
    + " (moezoo zoo --help). 'moezoo routing-report --config CONFIG': " + ROUTING_REPORT_HELP
    + " (moezoo routing-report --help)."
)


def _zoo_main(argv: Sequence[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from moezoo.zoo import get_entry, list_models

    parser = argparse.ArgumentParser(prog="moezoo zoo", description=ZOO_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="print the registry as a table")
    ls.add_argument("pattern", nargs="?", default="*", help="shell-style name pattern")
    ls.add_argument("--pretrained", action="store_true", help="only entries with weights")
    ev = sub.add_parser("eval", help="evaluate an entry (published weights, or --ckpt)")
    ev.add_argument("name")
    ev.add_argument("--ckpt", default=None, help="a safetensors file/folder or a `moezoo fit` .ckpt")
    ev.add_argument("--data-dir", default=None,
                    help="data on disk for entries evaluated on it (vmoe entries: an ImageFolder tree, val/<class>/)")
    ev.add_argument("--split", default=None, help="split folder under --data-dir (default: val)")
    ev.add_argument("--batch-size", type=int, default=None, help="evaluation batch size (= routing groups' batch)")
    conv = sub.add_parser("convert", help="convert a foreign checkpoint into an exported moezoo folder")
    conv.add_argument("format", choices=["vmoe"])
    conv.add_argument("source", help="a vmoe zoo entry, or a checkpoint prefix (local, gs://, https://)")
    conv.add_argument("directory")
    conv.add_argument("--k", type=int, default=None)
    conv.add_argument("--group-images", type=int, default=None)
    conv.add_argument("--group-size", type=int, default=None, help="routing group in tokens")
    conv.add_argument("--capacity-factor", type=float, default=None)
    conv.add_argument("--batch-priority", action=argparse.BooleanOptionalAction, default=None)
    conv.add_argument("--capacity-multiple-of", type=int, default=None)
    conv.add_argument("--bfloat16-dispatch", action=argparse.BooleanOptionalAction, default=None)
    conv.add_argument("--img-size", type=int, default=None)
    conv.add_argument("--ensemble-size", type=int, default=None)
    rel = sub.add_parser("release", help="ship a trained checkpoint: weights, results JSON, card")
    rel.add_argument("name")
    rel.add_argument("--ckpt", required=True)
    rel.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    card = sub.add_parser("card", help="re-render an entry's model card from its recorded results")
    card.add_argument("name")
    info = sub.add_parser("info", help="an entry's configuration and model card")
    info.add_argument("name")
    export = sub.add_parser("export", help="write an HF-style folder: config.json, model.safetensors, README.md")
    export.add_argument("name")
    export.add_argument("directory")
    export.add_argument("--ckpt", default=None, help="export this checkpoint instead of the shipped weights")
    args = parser.parse_args(list(argv))
    console = Console()

    if args.command == "list":
        table = Table(title="moezoo models")
        for column in ("name", "modality", "params total / active", "experts", "weights", "key metric"):
            table.add_column(column, overflow="fold")
        for name in list_models(args.pattern, pretrained=args.pretrained):
            table.add_row(*_zoo_row(get_entry(name)))
        console.print(table)
    elif args.command == "eval":
        from moezoo.zoo.release import evaluate_entry

        options = {k: v for k, v in (("data_dir", args.data_dir), ("split", args.split),
                                      ("batch_size", args.batch_size)) if v is not None}
        console.print_json(data=evaluate_entry(args.name, args.ckpt, **options))
    elif args.command == "convert":
        from moezoo.modalities.vision.vmoe_convert import convert_vmoe_checkpoint

        routing = {k: getattr(args, k) for k in ("k", "group_images", "group_size", "capacity_factor",
                                                 "batch_priority", "capacity_multiple_of", "bfloat16_dispatch",
                                                 "img_size", "ensemble_size")}
        target = convert_vmoe_checkpoint(args.source, args.directory, **routing)
        console.print(f"converted {args.source} to {target}")
    elif args.command == "release":
        from moezoo.zoo.release import release

        console.print_json(data=release(args.name, args.ckpt, dtype=args.dtype))
    elif args.command == "card":
        from moezoo.zoo.cards import write_card

        console.print(f"wrote {write_card(get_entry(args.name))}")
    elif args.command == "info":
        from rich.markdown import Markdown

        from moezoo.zoo.cards import card_path

        entry = get_entry(args.name)
        console.print_json(data={
            "name": entry.name,
            "modality": entry.modality,
            "builder": f"{entry.builder.__module__}.{entry.builder.__qualname__}",
            "args": entry.default_args,
            "pretrained": None if entry.pretrained_cfg is None else entry.pretrained_cfg.source,
        })
        path = card_path(entry.name)
        console.print(Markdown(path.read_text()) if path.is_file() else "(no model card)")
    elif args.command == "export":
        from moezoo.zoo import create_model, export_model
        from moezoo.zoo.cards import card_path

        entry = get_entry(args.name)
        model = create_model(args.name, pretrained=args.ckpt is None and entry.pretrained_cfg is not None,
                             checkpoint_path=args.ckpt)
        path = card_path(args.name)
        target = export_model(model, args.directory, card=path.read_text() if path.is_file() else None)
        console.print(f"exported {args.name} to {target}")
    return 0


def _zoo_row(entry) -> tuple[str, ...]:
    """name, modality, parameters (counted on the meta device: nothing is allocated), experts per
    routed layer, weights source, and the card's headline metric when its results are recorded."""
    import json

    import torch

    from moezoo.layers.routed import parameter_counts, routed_layers
    from moezoo.zoo.cards import results_path

    with torch.device("meta"):
        model = entry.builder(**entry.default_args)
    counts = parameter_counts(model)
    experts = sorted({getattr(layer, "num_experts", 0) for _, layer in routed_layers(model)} - {0})
    metric = "-"
    path = results_path(entry.name)
    if path.is_file() and entry.card.get("card_metrics"):
        key = entry.card["card_metrics"][0]
        metric = f"{key} {json.loads(path.read_text())['metrics'][key]:.4g}"

    def human(n: int) -> str:
        return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"

    source = entry.pretrained_cfg.source if entry.pretrained_cfg else "-"
    return (entry.name, entry.modality, f"{human(counts['total'])} / {human(counts['active'])}",
            ",".join(map(str, experts)) or "-", source, metric)


def _routing_report_main(argv: Sequence[str]) -> int:
    """``moezoo routing-report --config CFG [--ckpt PATH] [--split val] [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="moezoo routing-report", description=ROUTING_REPORT_HELP)
    parser.add_argument("--config", required=True, help="the LightningCLI config of the run")
    parser.add_argument("--ckpt", default=None,
                        help="weights: a `moezoo fit` .ckpt or safetensors file/folder (default: the config's init)")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--out", default="routing_report")
    parser.add_argument("--max-batches", type=int, default=None)
    args = parser.parse_args(list(argv))

    from moezoo.report import routing_report
    from moezoo.zoo.checkpoint import load_checkpoint

    cli = MoezooCLI(args=["--config", args.config, "--trainer.logger", "false"], run=False)
    task = cli.model
    model = getattr(task, "model", task)
    if args.ckpt:
        load_checkpoint(model, args.ckpt)
    cli.datamodule.setup("fit" if args.split != "test" else "test")
    loader = getattr(cli.datamodule, f"{args.split}_dataloader")()
    task.eval()
    record = routing_report(model, loader, args.out, title=f"routing report: {args.config} ({args.split})",
                            max_batches=args.max_batches, run_batch=task.predict_step)
    print(f"wrote {Path(args.out) / 'report.html'} ({record['batches']} batches, {len(record['layers'])} layers)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``moezoo`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "zoo":
        return _zoo_main(args[1:])
    if args and args[0] == "routing-report":
        return _routing_report_main(args[1:])
    # LightningCLI reads sys.argv itself; pass args only when called from Python.
    MoezooCLI(args=None if argv is None else args,
              parser_kwargs={"description": "moezoo: LightningCLI for the zoo's tasks.", "epilog": OTHER_COMMANDS})
    return 0


if __name__ == "__main__":
    sys.exit(main())
