"""`ovdet weights list|path|import|convert`: see, locate, install and convert model weights files."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ovdet.cli import HelpFormatter
from ovdet.cli._common import add_trust_option


def _describe_when_shown(parser: argparse.ArgumentParser, describe: Callable[[], str]) -> None:
    """Set parser.description from describe() only when its help is shown: the weights folder comes from
    ovdet.weights.registry, whose imports (tqdm, http.client) building the parser for every other command need not pay for."""
    format_help = parser.format_help

    def format_help_described() -> str:
        parser.description = describe()
        return format_help()

    parser.format_help = format_help_described


def _description() -> str:
    from ovdet.weights import registry as weights

    return f"Manage model weights. Files live in $OVDET_HOME/weights (now {weights.weights_dir()})."


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `weights` command and its four actions."""
    parser = sub.add_parser(
        "weights",
        help="list, locate or import model weights",
        formatter_class=HelpFormatter,
    )
    _describe_when_shown(parser, _description)
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
    add_trust_option(imp)
    conv = actions.add_parser(
        "convert",
        help="write a .pt detector as NAME.safetensors + NAME.json (no pickle: loading it cannot run code)",
        description="Convert a YOLO-World .pt checkpoint into a safetensors file plus its model config (json), "
                    "next to it. ovdet loads the pair anywhere a .pt works (--model NAME.safetensors), with "
                    "identical detections.",
        formatter_class=HelpFormatter,
    )
    conv.add_argument("path", metavar="FILE", help="the .pt checkpoint to convert, or a detector name")
    conv.add_argument("--out", default=None,
                      help="output path without suffix (default: FILE without .pt; for a name, NAME in the current "
                           "folder)")
    add_trust_option(conv)
    return parser


def _list() -> int:
    from ovdet.weights import registry as weights

    rows = [(row.name, row.kind, str(row.path) if row.path else "missing") for row in weights.list_models()]
    header = ("NAME", "KIND", "LOCAL")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(2)]
    for name, kind, local in [header, *rows]:
        print(f"{name:<{widths[0]}}  {kind:<{widths[1]}}  {local}")
    return 0


def _path(name: str, download: bool) -> int:
    from ovdet.weights import registry as weights

    spec = weights.lookup(name)
    if spec is not None and spec.kind == "text":
        print(weights.resolve_text_model(name, download=download))
    elif spec is not None and spec.kind == "segmenter":
        print(weights.resolve_segmenter(name, download=download))
    else:
        print(weights.resolve_detector(name, download=download))
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action."""
    from ovdet.weights import registry as weights

    if args.weights_action == "list":
        return _list()
    if args.weights_action == "path":
        return _path(args.name, args.download)
    if args.weights_action == "convert":
        from pathlib import Path

        from ovdet.weights.checkpoint import convert_to_safetensors

        is_file = Path(args.path).expanduser().is_file()
        src = Path(args.path).expanduser() if is_file else weights.resolve_detector(args.path)
        dest = args.out if args.out or is_file else Path.cwd() / src.stem
        out = convert_to_safetensors(src, dest, trust=args.trust_weights)
        print(f"Wrote {out} and {out.with_suffix('.json')}")
        print(f"Use it as: --model {out}")
        return 0
    dest = weights.import_weights(args.path, name=args.name, trust_weights=args.trust_weights)
    print(f"Imported {args.path} -> {dest}")
    spec = weights.lookup(dest.name)
    if spec is not None and spec.kind == "text":
        print("It is now found as the default text tower (text model None or clip-vit-b32).")
    elif spec is not None and spec.kind == "segmenter":
        print(f"Use it as: --masks {spec.name}")
    else:
        print(f"Use it as: --model {dest.stem}")
    return 0
