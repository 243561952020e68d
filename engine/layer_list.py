"""``engine layers``: every registered layer type, one per line (Caffe's layer registry, as
pycaffe's ``caffe.layer_type_list()`` gives it), optionally with what each one is."""

from __future__ import annotations

import argparse

from engine.layer import LAYERS
from engine.mode import layer_type_list


def summary_line(type_name: str) -> str:
    """The first line of the layer class's docstring."""
    doc = (LAYERS[type_name].__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def layers_command(args: argparse.Namespace) -> int:
    """List every registered layer type (what a prototxt's `type:` may name)."""
    names = layer_type_list()
    if args.describe:
        width = max(len(n) for n in names)
        for name in names:
            print(f"{name:<{width}}  {summary_line(name)}".rstrip())
    else:
        print("\n".join(names))
    return 0


def add_commands(subparsers, add_command, net_state_flags) -> None:
    """Register ``engine layers`` (from engine/cli.py)."""
    p = add_command(subparsers, layers_command, "layers")
    p.add_argument("--describe", action="store_true",
                   help="add the first line of each layer's documentation")
