"""``engine layers``: every registered layer type, one per line (Caffe's layer registry, as
pycaffe's ``caffe.layer_type_list()`` gives it), optionally with what each one is."""

from __future__ import annotations

import argparse

from engine.layer import LAYERS
from engine.mode import layer_type_list


def summary_line(type_name: str) -> str:
    """The first line of the layer class's docstring, carried on to the end of the sentence it
    breaks off (the first paragraph's lines joined up to the next full stop)."""
    doc = (LAYERS[type_name].__doc__ or "").strip()
    if not doc:
        return ""
    first = doc.splitlines()[0]
    paragraph = " ".join(line.strip() for line in doc.split("\n\n")[0].splitlines())
    if first.endswith((".", ":")):
        return first
    stop = paragraph.find(". ", len(first))
    return paragraph if stop < 0 else paragraph[:stop + 1]


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
