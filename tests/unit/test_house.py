"""The house rules that keep one place for each shared piece (docs/ARCHITECTURE.md section 3).

Every command takes ``--lake`` from the one options module and opens the lake through its one
opener; the metric definitions import no scipy until a cluster count runs; the writer needs only
the lake root, so ``vrp.lake.writer`` does not import the reader.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import click
import pytest
from click.testing import CliRunner

import vrp
import vrp.lake.lake
import vrp.lake.writer
from vrp.analysis.store import fit_and_store_probes
from vrp.analysis.synthetic import write_synthetic_lake
from vrp.cli import COMMANDS, main
from vrp.cli import options as opts
from vrp.lake import RunWriter, open_lake
from vrp.lake.storage import is_remote


def _all_commands() -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = []

    def walk(name: str, command: click.Command) -> None:
        found.append((name, command))
        if isinstance(command, click.Group):
            for sub_name, sub in command.commands.items():
                walk(f"{name} {sub_name}", sub)

    ctx = click.Context(main)
    for name in COMMANDS:
        command = main.get_command(ctx, name)
        assert command is not None, name
        walk(name, command)
    return found


def test_every_lake_option_is_the_shared_one() -> None:
    with_lake = []
    for name, command in _all_commands():
        for param in command.params:
            if "--lake" in getattr(param, "opts", ()):
                with_lake.append(name)
                assert param.name == "lake_dir", name
                assert param.help == opts.LAKE_HELP, name
                assert param.envvar is None and param.default is None, name  # $VRP_LAKE via lake_root
    # every command that touches a lake, including the five intervention/ingest ones
    expected = {"query", "report", "demo", "ingest run", "analyze probes", "lake info"}
    expected |= {f"ingest intervene {k}" for k in ("mask", "ablate", "destroy")}
    assert expected <= set(with_lake)


def test_the_lake_root_comes_from_the_option_then_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("VRP_LAKE", raising=False)
    assert opts.lake_root(None) == "./vrp-lake"
    monkeypatch.setenv("VRP_LAKE", "/data/lake")
    assert opts.lake_root(None) == "/data/lake"
    assert opts.lake_root("elsewhere") == "elsewhere"


@pytest.mark.parametrize(
    "args",
    [
        ["query", "select 1"],
        ["lake", "info"],
        ["analyze", "margins"],
        ["report"],
        ["ingest", "intervene", "mask", "--base-run", "r1"],
    ],
)
def test_a_missing_local_lake_is_one_clear_line(tmp_path, args) -> None:
    missing = tmp_path / "nothing-here"
    result = CliRunner().invoke(main, [*args, "--lake", str(missing)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: no lake at {missing}: ingest a run first (vrp ingest run), or pass --lake DIR / set VRP_LAKE"
    )
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_the_opener_asks_storage_whether_a_root_is_remote(tmp_path) -> None:
    assert is_remote("s3://bucket/lake") and not is_remote(str(tmp_path))
    with pytest.raises(click.ClickException, match="no lake at"):
        opts.open_existing_lake(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    assert opts.open_existing_lake(str(tmp_path / "empty")).versions() == {}


@pytest.mark.parametrize(
    ("parse", "text", "value"),
    [
        (opts.parse_int_list, "-1, -2", (-1, -2)),
        (opts.parse_int_list, "all", None),
        (opts.parse_float_list, "0.05,0.5", [0.05, 0.5]),
        (opts.parse_shard, "2/3", (1, 3)),
        (opts.parse_bytes, "50GiB", 50 * 1024**3),
        (opts.parse_bytes, "1.5kb", 1500),
    ],
)
def test_parsers_on_worked_examples(parse, text, value) -> None:
    assert parse(text) == value


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (opts.parse_int_list, "1,x"),
        (opts.parse_float_list, "a"),
        (opts.parse_shard, "4/3"),
        (opts.parse_shard, "1-3"),
        (opts.parse_bytes, "3 parsecs"),
    ],
)
def test_parsers_refuse_bad_text_with_a_usage_error(parse, text) -> None:
    with pytest.raises(click.BadParameter):
        parse(text)


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; {code}; print(' '.join(sorted(sys.modules)))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return set(out.split())


def test_metrics_import_scipy_only_when_a_cluster_count_runs() -> None:
    loaded = _modules_after("from vrp.metrics.attention import spatial_entropy; spatial_entropy([1.0, 2.0])")
    assert "scipy" not in loaded and "sklearn" not in loaded and "torch" not in loaded
    loaded = _modules_after(
        "import numpy as np; from vrp.metrics.attention import cluster_count; cluster_count(np.eye(4))"
    )
    assert "scipy.ndimage" in loaded and "sklearn" not in loaded


@pytest.mark.parametrize(("preset", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_command_lets_idle_torch_threads_sleep_unless_told_otherwise(preset, expected) -> None:
    """Set before torch loads (the command imports no torch at startup), and never over the user's."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset is not None:
        env["OMP_WAIT_POLICY"] = preset
    code = "import os, sys, vrp.cli; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    assert out.stdout.split() == [expected, "False"]


def _imported_modules(module: ModuleType) -> set[str]:
    tree = ast.parse(Path(module.__file__ or "").read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names


def test_the_writer_does_not_import_the_reader() -> None:
    """No lake <-> writer cycle: the reader builds writers, the writer never needs a reader."""
    imported = _imported_modules(vrp.lake.writer)
    assert not {"vrp.lake.lake", "vrp.lake.Lake"} & imported
    assert "vrp.lake.writer" in _imported_modules(vrp.lake.lake)


def test_a_writer_needs_only_the_lake_root(tmp_path) -> None:
    from lake_util import batch_rows, make_run, sample_ids

    run = make_run()
    writer = RunWriter(str(tmp_path), run)
    assert writer.begin() == set()
    writer.commit(batch_rows(sample_ids(3)))
    writer.finish()
    lake = open_lake(tmp_path)
    assert lake.arrow("samples").num_rows == 3
    assert lake.arrow("runs").to_pylist()[0]["status"] == "complete"


def test_probes_fitted_by_the_function_equal_those_of_the_command(tmp_path) -> None:
    """`vrp analyze probes` and the demo share fit_and_store_probes: same rows either way."""
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        write_synthetic_lake(root, models=("m",), n=48, layers=3, hidden_size=8, interventions=False)
    outcomes = list(fit_and_store_probes(open_lake(a), n_boot=50, mlp=False))
    assert [o.written for o in outcomes] == [True] and outcomes[0].skipped is None
    result = CliRunner().invoke(main, ["analyze", "probes", "--lake", str(b), "--n-boot", "50", "--no-mlp"])
    assert result.exit_code == 0, result.output
    keep = ["probe", "layer", "auroc", "auroc_low", "auroc_high", "accuracy", "n"]
    by_function = (
        open_lake(a)
        .arrow("probe_layers")
        .select(keep)
        .sort_by([("probe", "ascending"), ("layer", "ascending")])
    )
    by_command = (
        open_lake(b)
        .arrow("probe_layers")
        .select(keep)
        .sort_by([("probe", "ascending"), ("layer", "ascending")])
    )
    assert by_function.to_pylist() == by_command.to_pylist()
    neurons_a = open_lake(a).arrow("probe_neurons").select(["layer", "method", "neuron", "rank"]).to_pylist()
    neurons_b = open_lake(b).arrow("probe_neurons").select(["layer", "method", "neuron", "rank"]).to_pylist()
    assert sorted(neurons_a, key=str) == sorted(neurons_b, key=str) and neurons_a


#: docs/ARCHITECTURE.md section 3: the rooms of vrp/ and the rooms each may import. The package
#: root (`import vrp` for __version__) is open to all. A new room goes here and in that table.
ROOMS: dict[str, set[str]] = {
    "schema": set(),
    "metrics": set(),
    "lake": {"schema", "cli"},
    "cli": {"lake"},
    "ingest": {"schema", "metrics", "lake", "cli", "toys", "tasks", "runs"},
    "tasks": set(),
    "runs": {"lake"},
    "interventions": {"schema", "lake", "cli", "tasks", "ingest", "runs"},
    "analysis": {"schema", "metrics", "lake", "cli", "view"},
    "view": {"schema", "lake", "cli"},
    "toys": {"ingest", "tasks"},
    "demo": {
        "schema",
        "metrics",
        "lake",
        "cli",
        "ingest",
        "interventions",
        "analysis",
        "toys",
        "tasks",
        "view",
    },
    "queries": set(),
    "__init__": {"lake"},
}


def _room_of(path: Path, package: Path) -> str:
    parts = path.relative_to(package).parts
    return parts[0] if len(parts) > 1 else path.stem


def _type_only(tree: ast.Module) -> set[int]:
    """Ids of the nodes under ``if TYPE_CHECKING:``: type-only imports bind no room at run time."""
    guarded = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
    ]
    return {id(child) for node in guarded for stmt in node.body for child in ast.walk(stmt)}


def test_rooms_import_only_what_the_architecture_allows() -> None:
    package = Path(vrp.__file__).resolve().parent
    wrong = []
    for path in sorted(package.rglob("*.py")):
        room = _room_of(path, package)
        assert room in ROOMS, f"new room {room!r}: add it to ROOMS here and to docs/ARCHITECTURE.md section 3"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        type_only = _type_only(tree)
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                if parts[0] != "vrp" or len(parts) == 1:
                    continue
                if parts[1] != room and parts[1] not in ROOMS[room]:
                    wrong.append(f"{path.relative_to(package)} ({room}) imports {target}")
    assert not wrong, "\n".join(wrong)


def _readme() -> str:
    return (Path(vrp.__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_the_readme_documents_every_command() -> None:
    readme = _readme()
    leaves = [name for name, command in _all_commands() if not isinstance(command, click.Group)]
    missing = [name for name in leaves if f"`vrp {name}`" not in readme]
    assert not missing, f"add these commands to the README's command table: {missing}"


def test_the_readme_layout_names_every_room_of_the_tree() -> None:
    readme = _readme()
    layout = readme[readme.index("## Layout") :]
    layout = layout[: layout.index("\n## ", 1)]
    package = Path(vrp.__file__).resolve().parent
    entries = [
        f"vrp/{p.name}/" if p.is_dir() else f"vrp/{p.name}"
        for p in package.iterdir()
        if p.name != "__init__.py" and not p.name.startswith((".", "__pycache__"))
    ]
    root = package.parent
    entries += [f"{d}/" for d in ("docs", "tests", "benchmarks") if (root / d).is_dir()]
    missing = [e for e in entries if e not in layout]
    assert not missing, f"the README's Layout lacks {missing}"


def test_every_test_file_sits_in_its_layer() -> None:
    """tests/unit (no model), tests/models (tiny checkpoints), tests/e2e (whole runs): `make test-fast`
    runs tests/unit only, so a test file left at the top would never run in the edit-run loop."""
    tests = Path(__file__).resolve().parents[1]
    loose = sorted(p.name for p in tests.glob("test_*.py"))
    assert not loose, f"move {loose} into tests/unit, tests/models or tests/e2e (docs/CONTRIBUTING.md, Tests)"
    assert all((tests / layer).is_dir() for layer in ("unit", "models", "e2e"))
