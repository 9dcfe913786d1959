"""`ovdet weights list|path|import`: see, locate and install model weights files."""

from __future__ import annotations

import argparse

from ovdet import weights
from ovdet.cli import HelpFormatter


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `weights` command and its three actions."""
    parser = sub.add_parser(
        "weights",
        help="list, locate or import model weights",
        description=f"Manage model weights. Files live in $OVDET_HOME/weights (now {weights.weights_dir()}).",
        formatter_class=HelpFormatter,
    )
    actions = parser.add_subparsers(dest="weights_action", metavar="ACTION")
    actions.required = True
    actions.add_parser(
        "list",
        help="show every known model and where it is stored locally",
        formatter_class=HelpFormatter,
    )
    path = actions.add_parser(
        "path",
        help="print the local file of a model name",
        formatter_class=HelpFormatter,
    )
    path.add_argument("name", metavar="NAME", help="model name (see `ovdet weights list`) or file path")
    path.add_argument("--download", action="store_true", help="download the file when it is missing and online")
    imp = actions.add_parser(
        "import",
        help="copy a downloaded weights file into the ovdet cache so it resolves by name",
        formatter_class=HelpFormatter,
    )
    imp.add_argument("path", metavar="PATH", help="the .pt file to import")
    imp.add_argument("--name", default=None, help="name to store it under; none keeps the file's own name")
    return parser


def _list() -> int:
    rows = [(row.name, row.kind, str(row.path) if row.path else "missing") for row in weights.list_models()]
    header = ("NAME", "KIND", "LOCAL")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(2)]
    for name, kind, local in [header, *rows]:
        print(f"{name:<{widths[0]}}  {kind:<{widths[1]}}  {local}")
    return 0


def _path(name: str, download: bool) -> int:
    spec = weights.lookup(name)
    if spec is not None and spec.kind == "text":
        print(weights.resolve_text_model(name, download=download))
    else:
        print(weights.resolve_detector(name, download=download))
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action."""
    if args.weights_action == "list":
        return _list()
    if args.weights_action == "path":
        return _path(args.name, args.download)
    dest = weights.import_weights(args.path, name=args.name)
    print(f"Imported {args.path} -> {dest}")
    spec = weights.lookup(dest.name)
    if spec is not None and spec.kind == "text":
        print("It is now found as the default text tower (text model None or clip-vit-b32).")
    else:
        print(f"Use it as: --model {dest.stem}")
    return 0
