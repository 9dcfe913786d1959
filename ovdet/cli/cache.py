"""`ovdet cache info|clear`: see and empty the on-disk cache of prompt embeddings."""

from __future__ import annotations

import argparse

from ovdet.cli import HelpFormatter
from ovdet.embedding_cache import MAX_MB_ENV, EmbeddingCache


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `cache` command and its two actions."""
    parser = sub.add_parser("cache", help="show or clear the prompt-embedding cache",
                            description=f"The text-embedding cache lives in $OVDET_HOME/embeddings; its size limit "
                                        f"is ${MAX_MB_ENV} megabytes.",
                            formatter_class=HelpFormatter)
    actions = parser.add_subparsers(dest="cache_action", metavar="ACTION")
    actions.required = True
    actions.add_parser("info", help="where the cache is, its size and limit, entries per text tower",
                       formatter_class=HelpFormatter)
    actions.add_parser("clear", help="delete every cached embedding",
                       formatter_class=HelpFormatter)
    return parser


def run(args: argparse.Namespace) -> int:
    """Dispatch to the chosen action."""
    cache = EmbeddingCache()
    if args.cache_action == "clear":
        gone = cache.clear()
        print(f"Removed {gone.entries} cached embedding(s), {_size(gone.bytes)}, from {cache.root}")
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
    return 0
