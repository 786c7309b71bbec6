"""Analyses whose results are stored in the lake: the probes and the probe-neuron rankings.

What this module offers: ``fit_and_store_probes(lake, ...)`` fits the held-out probes of every
capture run (and the L1/L2 neuron rankings on ``mlp_out``) and writes them to ``probe_layers``
and ``probe_neurons``, one run at a time, yielding a :class:`StoredProbes` per run so that a
caller can report progress as it goes.

Usage::

    for outcome in fit_and_store_probes(lake, n_boot=1000):
        print(outcome.model, outcome.skipped or outcome.probes.results[0].auroc)

Why a function and not only the ``vrp analyze probes`` command: the interventions read the
stored neuron rankings, so the demo (and any script) must be able to produce them without
going through a command line; both call this one function. Everything else in ``vrp.analysis``
only reads the lake (see ``compute``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from vrp.analysis import compute, data, stats
from vrp.analysis.probes import SEED, ProbeError
from vrp.lake import Lake
from vrp.lake.errors import damaged_file_error

#: ``progress(model)`` returns a wrapper of the per-layer iterable (e.g. a tqdm bar), or None.
ProgressFactory = Callable[[str], Callable[[Iterable], Iterable] | None]


@dataclass
class StoredProbes:
    """One capture run's probe outcome: the results, or why the run was skipped."""

    run_id: str
    model: str
    probes: compute.RunProbes | None = None
    neurons: list[dict] = field(default_factory=list)
    skipped: str | None = None
    written: bool = False


def fit_and_store_probes(
    lake: Lake,
    *,
    models: Sequence[str] | None = None,
    site: str = "resid",
    seed: int = SEED,
    n_boot: int = stats.N_BOOT,
    mlp: bool = True,
    neurons: bool = True,
    neuron_layers: Sequence[int] | None = None,
    write: bool = True,
    progress: ProgressFactory | None = None,
) -> Iterator[StoredProbes]:
    """Fit (and with `write`, store) the probes of every capture run of `models` (default: all).

    A run whose probes cannot be fitted (e.g. one class only) is yielded with ``skipped`` set;
    a run's previous rows for the same site are replaced, so a rerun never duplicates them.
    Raises ``ProbeError`` when `neuron_layers` names a layer without ``mlp_out`` states.
    """
    for run in data.base_runs(lake, models or None):
        run_id, model = run["run_id"], run["model"]
        try:
            rp = compute.run_probes(
                lake,
                run_id,
                site=site,
                seed=seed,
                n_boot=n_boot,
                mlp=mlp,
                progress=progress(model) if progress else None,
            )
        except (ProbeError, ValueError) as exc:
            if damaged_file_error(exc) is not None:
                raise  # a damaged lake file is the lake's problem, not this run's: stop with its error
            yield StoredProbes(run_id=run_id, model=model, skipped=str(exc))
            continue
        neuron_rows: list[dict] = []
        if neurons and data.hidden_layers(lake, run_id, "mlp_out"):
            neuron_rows = compute.neuron_rankings(lake, run_id, neuron_layers or None, seed=seed)
        if write:
            base = {"run_id": run_id, "model": model}
            lake.write_table(
                "probe_layers",
                [base | r.row() for r in rp.results],
                replace_where={"run_id": run_id, "site": site},
            )
            if neuron_rows:
                lake.write_table(
                    "probe_neurons",
                    [base | r for r in neuron_rows],
                    replace_where={"run_id": run_id, "site": "mlp_out"},
                )
        yield StoredProbes(run_id=run_id, model=model, probes=rp, neurons=neuron_rows, written=write)
