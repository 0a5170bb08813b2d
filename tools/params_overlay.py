"""Print the ``dvc exp run`` arguments that apply a partial params file on top of params.yaml.

A partial params file (such as params/mnist_gpu.yaml) has the layout of params.yaml but
only the keys it changes. This prints one ``-S key=value`` argument per leaf value, as
one line for the shell to split:

    dvc exp run -n mnist $(.venv/bin/python tools/params_overlay.py params/mnist_gpu.yaml)

Keys that params.yaml lacks (such as ``train.overrides.mnist.steps``) are written
``++key=value``, which DVC's override syntax needs in order to add a key. Values are
written in flow style without spaces, so that the shell keeps each argument whole.
Values that contain whitespace are rejected with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml


class OverlayError(Exception):
    """The partial params file cannot be turned into ``-S`` arguments."""


def leaves(mapping: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Return ``(dotted key, value)`` for every value of ``mapping`` that is not a non-empty mapping."""
    found = []
    for key, value in mapping.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            found.extend(leaves(value, f"{path}."))
        else:
            found.append((path, value))
    return found


def has_key(params: dict, dotted: str) -> bool:
    node: object = params
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def format_value(value: object, key: str) -> str:
    """Write ``value`` as a YAML flow value without spaces, e.g. ``[moons,mnist]``, ``0.0002``, ``true``."""
    if isinstance(value, list):
        return "[" + ",".join(format_value(item, key) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{format_value(name, key)}:{format_value(item, key)}" for name, item in value.items()) + "}"
    # A plain scalar is dumped with YAML's document end marker, "\n...\n", after it.
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n").removesuffix("\n...")
    if any(character.isspace() for character in text):
        raise OverlayError(f"the value of {key!r} contains whitespace ({text!r}); pass it to dvc exp run -S by hand, quoted")
    return text


def overlay_arguments(overlay: dict, params: dict) -> list[str]:
    """Return ``-S`` arguments, two list items each, that set every leaf of ``overlay``."""
    arguments = []
    for key, value in leaves(overlay):
        prefix = "" if has_key(params, key) else "++"
        arguments += ["-S", f"{prefix}{key}={format_value(value, key)}"]
    return arguments


def read_mapping(path: Path) -> dict:
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise OverlayError(f"{path}: cannot read the file ({error.strerror})") from error
    except yaml.YAMLError as error:
        raise OverlayError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from error
    if not isinstance(value, dict) or not value:
        raise OverlayError(f"{path}: expected a non-empty mapping of params.yaml keys")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print dvc exp run -S arguments that apply a partial params file.")
    parser.add_argument("overlay", type=Path, help="partial params file, e.g. params/mnist_gpu.yaml")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the full params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        arguments = overlay_arguments(read_mapping(args.overlay), read_mapping(args.params))
    except OverlayError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(" ".join(arguments))
    return 0


if __name__ == "__main__":
    sys.exit(main())
