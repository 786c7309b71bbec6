"""Options and argument parsers shared by every ``vrp`` command, and the one lake opener.

What this module offers:

- ``lake_option``: ``--lake DIR|s3://...`` (the value reaches the command as ``lake_dir``);
  ``lake_root(lake_dir)`` resolves it ($VRP_LAKE, else ./vrp-lake) for commands that may create
  the lake, ``open_existing_lake(lake_dir)`` opens it for commands that need it to exist.
- ``models_option``, ``seed_option``, ``n_boot_option``, ``batch_size_option``,
  ``device_option``, ``format_option``: the other options several commands declare.
- ``parse_int_list``, ``parse_float_list``, ``parse_bytes``, ``parse_shard``: text -> value
  parsers that raise ``click.BadParameter`` with an example of the expected form.
- ``user_errors(*types)``: turns the listed exception types into a one-line ``click`` error.
- ``LazyChoice(load)``: a choice whose values are read when first needed (the family registry
  imports torch; ``vrp --help`` must not).

Usage::

    @click.command()
    @lake_option
    @seed_option(default=0, help="Seed of the folds.")
    def my_command(lake_dir: str | None, seed: int) -> None:
        lake = open_existing_lake(lake_dir)

Why one module: an option declared in several places drifts (the lake opener once treated a
root as remote when it merely contained ``://``, while the lake itself asks
``storage.is_remote``). Importing this module costs click only, so ``vrp --help`` stays fast.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from vrp.lake import Lake

F = TypeVar("F", bound=Callable[..., Any])

LAKE_HELP = "Lake directory or s3://bucket/prefix (default: $VRP_LAKE, else ./vrp-lake)."

lake_option = click.option("--lake", "lake_dir", default=None, metavar="DIR", help=LAKE_HELP)

models_option = click.option(
    "--model",
    "models",
    multiple=True,
    metavar="NAME",
    help="Only this model (repeatable; default: every model in the lake).",
)

device_option = click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")


class LazyChoice(click.ParamType):
    """``click.Choice`` over ``load()``'s values, called only when a value or the help is needed."""

    name = "choice"

    def __init__(self, load: Callable[[], Sequence[str]]) -> None:
        self._load = load

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + "|".join(self._load()) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        choices = tuple(self._load())
        if value in choices:
            return str(value)
        self.fail(f"{value!r} is not one of {', '.join(repr(c) for c in choices)}.", param, ctx)


def seed_option(*, default: int = 0, help: str) -> Callable[[F], F]:
    """``--seed`` with the command's own default and meaning (what the seed drives differs)."""
    return click.option("--seed", default=default, show_default=True, type=int, help=help)


def n_boot_option(*, default: int, minimum: int = 0) -> Callable[[F], F]:
    """``--n-boot``: bootstrap resamples of the confidence intervals."""
    return click.option(
        "--n-boot",
        default=default,
        show_default=True,
        type=click.IntRange(min=minimum),
        help="Bootstrap resamples for the confidence intervals.",
    )


def batch_size_option(*, default: int = 8) -> Callable[[F], F]:
    """``--batch-size``: samples per forward pass."""
    return click.option("--batch-size", default=default, show_default=True, type=click.IntRange(min=1))


def format_option(*choices: str, default: str = "table", help: str = "Output format.") -> Callable[[F], F]:
    """``--format`` (value reaches the command as ``fmt``); pipelines ask for ``json``."""
    return click.option(
        "--format", "fmt", type=click.Choice(list(choices)), default=default, show_default=True, help=help
    )


def lake_root(lake_dir: str | None) -> str:
    """The lake root the user meant: ``--lake``, else $VRP_LAKE, else ./vrp-lake (may not exist yet)."""
    from vrp.lake import resolve_lake_root

    return resolve_lake_root(lake_dir)


def open_existing_lake(lake_dir: str | None) -> Lake:
    """The lake for a command that reads it: a missing local folder is an error saying what to do.

    An object-store root is opened as is (its absence shows as empty tables, not as a folder).
    """
    from vrp.lake import LakeError, open_lake
    from vrp.lake.storage import is_remote

    root = lake_root(lake_dir)
    if not is_remote(root) and not os.path.isdir(root):
        raise click.ClickException(
            f"no lake at {root}: ingest a run first (vrp ingest run), or pass --lake DIR / set VRP_LAKE"
        )
    try:
        return open_lake(root)
    except LakeError as exc:
        raise click.ClickException(str(exc)) from exc


@contextmanager
def user_errors(*types: type[BaseException], prefix: str = "") -> Iterator[None]:
    """Report the listed exception types as one-line ``click`` errors (no traceback for a user)."""
    try:
        yield
    except types as exc:
        from vrp.lake.errors import damaged_file_error

        raise click.ClickException(f"{prefix}{damaged_file_error(exc) or exc}") from exc


def parse_int_list(value: str | None, *, param_hint: str | None = None) -> tuple[int, ...] | None:
    """'-1,-2' -> (-1, -2); None or 'all' -> None (meaning every one)."""
    if value is None or value == "all":
        return None
    try:
        return tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError as exc:
        raise click.BadParameter(
            f"expected comma-separated integers or 'all', got {value!r}", param_hint=param_hint
        ) from exc


def parse_float_list(value: str, *, param_hint: str | None = None) -> list[float]:
    """'0.1,0.5' -> [0.1, 0.5]."""
    try:
        return [float(part) for part in value.split(",") if part.strip()]
    except ValueError as exc:
        raise click.BadParameter(
            f"expected comma-separated numbers, got {value!r}", param_hint=param_hint
        ) from exc


def parse_shard(value: str) -> tuple[int, int]:
    """'I/N' (1-based, as job arrays count) -> (I - 1, N)."""
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError as exc:
        raise click.BadParameter(f"expected I/N such as 1/3, got {value!r}") from exc
    if not 1 <= index <= count:
        raise click.BadParameter(f"shard {value}: I must be between 1 and N")
    return index - 1, count


_BYTE_UNITS = {
    "": 1,
    "B": 1,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
}


def parse_bytes(value: str) -> int:
    """'50GiB' -> 53687091200; binary (KiB..TiB) and decimal (KB..GB) units, case-insensitive."""
    text = value.strip().upper()
    number = text.rstrip("KMGTIB")
    unit = text[len(number) :]
    if unit not in _BYTE_UNITS:
        raise click.BadParameter(f"unknown size unit in {value!r}; use e.g. 500MiB or 20GiB")
    try:
        return int(float(number) * _BYTE_UNITS[unit])
    except ValueError as exc:
        raise click.BadParameter(f"expected a size such as 20GiB, got {value!r}") from exc
