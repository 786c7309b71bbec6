"""The `vrp` command line: one group per room of the architecture.

Each room owns its commands in its own module (``vrp/lake/commands.py``,
``vrp/ingest/commands.py``, ``vrp/analysis/commands.py``); this file only assembles them, so
``vrp --help`` lists everything a researcher can do.
"""

from __future__ import annotations

import importlib
import os

import click

# Torch's CPU threads spin between operations by default. On a machine where anything else runs, a
# spinning thread holds a core the other thread of the same operation is waiting for: a toy model's
# forward pass took 9x its quiet time beside one other two-thread process, and 4.5x with threads
# that sleep when idle, which cost 15% on a quiet machine (docs/ARCHITECTURE.md, "Threads").
# Set before torch loads (no command imports it at startup); a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# (module, attribute) of each top-level command; imported lazily so `vrp --help` stays fast
# and `vrp query` never imports torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "query": ("vrp.lake.commands", "query"),
    "lake": ("vrp.lake.commands", "lake"),
    "data": ("vrp.ingest.commands", "data"),
    "ingest": ("vrp.ingest.commands", "ingest"),
    "intervene": ("vrp.interventions.commands", "intervene"),
    "toy": ("vrp.ingest.commands", "toy"),
    "analyze": ("vrp.analysis.commands", "analyze"),
    "report": ("vrp.analysis.commands", "report"),
    "view": ("vrp.view.commands", "view"),
    "demo": ("vrp.demo", "demo"),
}

#: (group, name) -> the top-level command it also offers: `vrp ingest intervene` is the old home
#: of `vrp intervene`, kept so scripts written for it keep working.
ALIASES: dict[tuple[str, str], str] = {("ingest", "intervene"): "intervene"}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when they are run or listed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._load(name) is not None]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._load(cmd_name)

    def invoke(self, ctx: click.Context) -> object:
        """Run the command; lake errors and damaged lake files end in one line, not a traceback.

        One place for every command, so each reading command (query, report, analyze, export,
        drop-run, ...) says the same thing about a damaged file: which one, and to run
        `vrp lake check`.
        """
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except Exception as exc:
            from vrp.lake.errors import LakeError, damaged_file_error

            damaged = damaged_file_error(exc)
            if damaged is not None:
                raise click.ClickException(str(damaged)) from exc
            if isinstance(exc, LakeError):
                raise click.ClickException(str(exc)) from exc
            raise

    @staticmethod
    def _load(name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # that room has not been built yet
                return None
            raise
        command = getattr(module, attr, None)
        if isinstance(command, click.Group):
            for (group, alias), target in ALIASES.items():
                if group == name and alias not in command.commands:
                    aliased = LazyGroup._load(target)
                    if aliased is not None:
                        command.add_command(aliased, alias)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vrp")
def main() -> None:
    """VRP, the VLM Reliability Probe.

    Run a vision-language model once over a benchmark, yes/no (POPE) or open answers (VQAv2)
    (`vrp ingest run`), store every signal in an activation lake of Delta/Parquet tables, then
    ask questions with SQL (`vrp query`), analyses (`vrp analyze`), reports (`vrp report`) and
    a per-sample viewer (`vrp view`).

    The lake is `--lake DIR`, else $VRP_LAKE, else ./vrp-lake.
    """
