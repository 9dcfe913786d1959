"""`ovdet cache info|clear`: see and empty the on-disk caches (prompt embeddings, compiled models)."""

from __future__ import annotations

import argparse

from ovdet.cli import HelpFormatter
from ovdet.options import EMBEDDING_CACHE_MB_ENV as MAX_MB_ENV


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `cache` command and its two actions."""
    parser = sub.add_parser("cache", help="show or clear the prompt-embedding and compiled-model caches",
                            description=f"The text-embedding cache lives in $OVDET_HOME/embeddings; its size limit "
                                        f"is ${MAX_MB_ENV} megabytes. Models exported for the openvino / onnxruntime "
                                        "/ tensorrt backends live in $OVDET_HOME/compiled, one folder per weights, "
                                        "backend, precision and library versions.",
                            formatter_class=HelpFormatter)
    actions = parser.add_subparsers(dest="cache_action", metavar="ACTION")
    actions.required = True
    actions.add_parser("info", help="where the caches are, their sizes, entries per text tower and compiled models",
                       formatter_class=HelpFormatter)
    clear = actions.add_parser("clear", help="delete every cached embedding and compiled model",
                               formatter_class=HelpFormatter)
    which = clear.add_mutually_exclusive_group()
    which.add_argument("--embeddings", action="store_true", help="only the prompt embeddings")
    which.add_argument("--compiled", action="store_true", help="only the compiled models")
    return parser


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action."""
    from ovdet.backends.cache import CompiledCache
    from ovdet.text.cache import EmbeddingCache

    cache = EmbeddingCache()
    compiled = CompiledCache()
    if args.cache_action == "clear":
        if not args.compiled:
            gone = cache.clear()
            print(f"Removed {gone.entries} cached embedding(s), {_size(gone.bytes)}, from {cache.root}")
        if not args.embeddings:
            entries, size = compiled.clear()
            print(f"Removed {entries} compiled model(s), {_size(size)}, from {compiled.root}")
        return 0
    info = cache.info()
    print(f"embedding cache: {info.root}")
    print(f"size: {_size(info.bytes)} in {info.entries} entries (limit {_size(info.max_bytes)}, set with "
          f"{MAX_MB_ENV})")
    if info.towers:
        width = max(len(t.identity) for t in info.towers)
        print(f"{'TEXT TOWER':<{width}}  {'ENTRIES':>7}  SIZE")
        for tower in info.towers:
            print(f"{tower.identity:<{width}}  {tower.entries:>7}  {_size(tower.bytes)}")
    entries = compiled.entries()
    print(f"compiled models: {compiled.root}")
    print(f"size: {_size(sum(e.bytes for e in entries))} in {len(entries)} entries (clear with `ovdet cache clear "
          "--compiled`; a missing entry is rebuilt when next needed)")
    if entries:
        width = max(len(e.name) for e in entries)
        print(f"{'ENTRY':<{width}}  {'SIZE':>9}  MODEL")
        for e in entries:
            print(f"{e.name:<{width}}  {_size(e.bytes):>9}  {e.fields.get('model', e.fields.get('state', '?'))}")
    return 0
