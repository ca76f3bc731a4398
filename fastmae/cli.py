"""Command lines for training scripts: a dataclass of settings becomes an argparse parser.

Each field is a flag in two spellings, ``--batch-size`` (shown in ``--help``) and the original MAE scripts'
``--batch_size`` (hidden); a bool field is ``--flag`` / ``--no-flag`` (and ``--no_flag``). A field's
``metadata`` gives its ``help`` and ``choices``. Flags an older command line passes that have no field here
(:class:`LegacyFlag`) are accepted with a one-line note instead of an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Callable, Mapping
from typing import NamedTuple

_HIDDEN = {"help": argparse.SUPPRESS, "default": argparse.SUPPRESS}


class LegacyFlag(NamedTuple):
    """A flag accepted for compatibility: its value type (``bool``: a switch), the note printed when it is
    given, and the field that takes its value (None: ignored)."""

    kind: type
    note: str
    field: str | None = None


TORCHRUN = "set by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); ignored"
SUBMITIT = "a submitit scheduler flag; fastmae submits no job: run torchrun --nnodes N --nproc_per_node G; ignored"
# The flags of the original MAE main_pretrain.py (and submitit_pretrain.py) that a torchrun script replaces.
ORIGINAL_PRETRAIN_FLAGS = {
    **{name: LegacyFlag(kind, TORCHRUN) for name, kind in [("world_size", int), ("local_rank", int)]},
    **{name: LegacyFlag(kind, TORCHRUN) for name, kind in [("dist_url", str), ("dist_on_itp", bool)]},
    "job_dir": LegacyFlag(str, "submitit's job folder, used as --output-dir", "output_dir"),
    **{name: LegacyFlag(kind, SUBMITIT) for name, kind in [("ngpus", int), ("nodes", int), ("timeout", int)]},
    **{
        name: LegacyFlag(kind, SUBMITIT) for name, kind in [("partition", str), ("comment", str), ("use_volta32", bool)]
    },
}


def option(default, help: str, choices: tuple | None = None):
    """A dataclass field for :func:`build_parser`: its default, ``--help`` text and allowed values."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": choices}
    return dataclasses.field(default=default, metadata=metadata)


def build_parser(
    config: type, description: str, legacy: Mapping[str, LegacyFlag] | None = None
) -> argparse.ArgumentParser:
    """A parser with one flag per field of the dataclass ``config`` (see the module docstring).

    Args:
        config: the dataclass; each field's default is the flag's default.
        description: the ``--help`` header.
        legacy: flag name (underscore spelling, no dashes) → :class:`LegacyFlag`.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        kind = hints[f.name]
        base = next(a for a in typing.get_args(kind) if a is not type(None)) if typing.get_args(kind) else kind
        kw = {"dest": f.name, "help": f.metadata.get("help", "")}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = base
            kw["choices"] = f.metadata.get("choices")
        parser.add_argument(f"--{f.name.replace('_', '-')}", default=f.default, **kw)
        if "_" in f.name:  # the original's spelling, hidden from --help
            parser.add_argument(f"--{f.name}", **{**kw, **_HIDDEN})
            if base is bool:
                parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", **_HIDDEN)
    for name, flag in (legacy or {}).items():
        action = {"action": "store_true"} if flag.kind is bool else {"type": flag.kind}
        spellings = sorted({f"--{name}", f"--{name.replace('_', '-')}"})
        parser.add_argument(*spellings, dest=f"legacy:{name}", **action, **_HIDDEN)
    return parser


def parse_config(
    config: type,
    argv: list[str] | None,
    description: str,
    presets: Mapping[str, Callable[[], dict]] | None = None,
    legacy: Mapping[str, LegacyFlag] | None = None,
    validate: Callable[[object], None] | None = None,
    error: type[Exception] = ValueError,
):
    """Parse ``argv`` into a ``config`` instance: field defaults < the ``preset`` field's values < flags given.

    Each legacy flag given prints its note on stderr (in the process of rank 0 only, as read from ``RANK``).

    Args:
        config, description, legacy: as :func:`build_parser`.
        argv: the arguments (None: ``sys.argv[1:]``).
        presets: a name of the ``preset`` field → a function returning that preset's defaults.
        validate: raises ``error`` for a config that cannot work; argparse then reports it (exit status 2).
        error: the exception ``validate`` raises.
    """
    presets, legacy = presets or {}, legacy or {}
    parser = build_parser(config, description, legacy)
    args = parser.parse_args(argv)
    if getattr(args, "preset", None):
        parser.set_defaults(**presets[args.preset]())
        args = parser.parse_args(argv)
    values = vars(args)
    given = {k.split(":", 1)[1]: values.pop(k) for k in list(values) if k.startswith("legacy:")}
    for name, value in given.items():
        if legacy[name].field is not None:
            values[legacy[name].field] = value
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"note: --{name} is {legacy[name].note}", file=sys.stderr, flush=True)
    cfg = config(**values)
    try:
        if validate is not None:
            validate(cfg)
    except error as e:
        parser.error(str(e))
    return cfg
