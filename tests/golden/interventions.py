"""The golden record of the mask / ablate / destroy rows on the three shipped toys.

``python tests/golden/interventions.py`` rewrites ``tests/golden/interventions.json``; it was
first run with the code of the single-module interventions (before ``vrp/interventions/``), so
``test_interventions_golden.py`` checks that moving the kinds into their own modules changed no row.

What is recorded: every column of every ``interventions`` row except ``run_id`` (a run id hashes
the schema version and the config layout, which may change without any answer changing) and
``model`` / ``base_run_id`` (named by the toy). Floats are stored with ``repr``, which round-trips
float64 exactly, so the comparison is bit for bit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: lake_util, also when run as a script

from lake_util import probe_neuron_rows  # noqa: E402

GOLDEN = Path(__file__).with_name("interventions.json")
TOYS = ("toy-llava", "toy-paligemma", "toy-qwen2vl")
QUESTIONS = 6
COMPARED = (
    "sample_id",
    "kind",
    "condition",
    "level",
    "setting",
    "detail",
    "answer_text",
    "answer",
    "parse_status",
    "correct",
    "yes_no_margin",
    "p_yes",
    "p_no",
    "seed",
)


def produce_rows(workdir: Path) -> dict[str, list[dict[str, Any]]]:
    """Ingest each toy on a few held-out questions, run mask, ablate and destroy; rows per toy."""
    from vrp.ingest.datasets import generate_shapes_pope
    from vrp.ingest.run import IngestOptions, run_ingest
    from vrp.interventions import plan_ablate, plan_destroy, plan_mask, run_intervention
    from vrp.lake import open_lake

    torch.set_num_threads(1)
    quiet = {"echo": lambda _line: None, "progress": False}
    data = generate_shapes_pope(workdir / "shapes", images=4, seed=2026)
    lake_dir = str(workdir / "lake")
    out: dict[str, list[dict[str, Any]]] = {}
    for toy in TOYS:
        options = IngestOptions(
            model=toy, data_dir=str(data), limit=QUESTIONS, batch_size=4, self_consistency=0
        )
        base = run_ingest(options, lake_dir, **quiet).run_id
        lake = open_lake(lake_dir)
        config = json.loads(lake.arrow("runs", filter={"run_id": base}).to_pylist()[0]["config"])
        hidden = int(config["hidden_size"])
        lake.write_table("probe_neurons", probe_neuron_rows(base, toy, 3, hidden)[0])
        plans = [
            plan_mask(lake, base, ratio=0.3, seed=1),
            plan_ablate(lake, base, layer=-1, top_k=3, mode="mean", seed=0),
            plan_destroy(lake, base, layer=-1, fractions=[0.25, 0.5], order="probe"),
            plan_destroy(lake, base, layer=1, fractions=[0.1], order="random", seed=4),
        ]
        rows: list[dict[str, Any]] = []
        for plan in plans:
            run_intervention(plan, lake_dir, batch_size=4, **quiet)
            table = open_lake(lake_dir).arrow("interventions", filter={"run_id": plan.run_id})
            rows.extend({c: r[c] for c in COMPARED} for r in table.to_pylist())
        out[toy] = sorted(
            rows, key=lambda r: (r["kind"], r["setting"], r["sample_id"], r["condition"], r["level"])
        )
    return out


def encode(rows: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Floats as their repr string, so JSON keeps every bit."""
    return {
        toy: [{k: repr(v) if isinstance(v, float) else v for k, v in row.items()} for row in toy_rows]
        for toy, toy_rows in rows.items()
    }


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        record = encode(produce_rows(Path(tmp)))
    lines = [
        f"{json.dumps(toy)}: [\n" + ",\n".join(json.dumps(row, sort_keys=True) for row in rows) + "\n]"
        for toy, rows in sorted(record.items())
    ]
    GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    print(f"wrote {sum(len(v) for v in record.values())} rows to {GOLDEN}", file=sys.stderr)
