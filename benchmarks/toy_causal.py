"""Activation patching and attention knockout on the three shipped toys (CPU, a few minutes).

    .venv/bin/python benchmarks/toy_causal.py --lake /tmp/causal-lake --questions 100

Ingests each toy on held-out shapes-POPE (the demo's seed; ``--questions`` per split, no
self-consistency), then runs ``patch`` at every site over every layer (answer position,
counterfactual pairs) and ``knockout`` of every single layer from the answer and from all text.
Prints, per toy: the (site, layer) with the highest mean restoration (also without the last
layer's residual, where restoration is 1 by construction) and the knockout window
that costs the most accuracy, from the named queries ``patch_restoration`` and
``knockout_effects`` (the report's figures read the same queries).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vrp.demo import TOYS, prepare_data
from vrp.ingest.run import IngestOptions, run_ingest
from vrp.interventions import plan_knockout, plan_patch, run_intervention
from vrp.lake import open_lake
from vrp.lake.query import named_query


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", required=True)
    parser.add_argument("--questions", type=int, default=100, help="questions per split")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet = {"echo": lambda _line: None, "progress": False}
    data = prepare_data(Path(f"{args.lake.rstrip('/')}-data"), args.questions)
    started = time.monotonic()
    for toy in TOYS:
        options = IngestOptions(model=toy, data_dir=str(data), batch_size=16, self_consistency=0)
        base = run_ingest(options, args.lake, **quiet).run_id
        lake = open_lake(args.lake)
        plans = [
            plan_patch(lake, base, site=site, layers="all", pairs="counterfactual", seed=0)
            for site in ("resid", "attn_out", "mlp_out")
        ]
        plans += [plan_knockout(lake, base, layers="all", source=source) for source in ("answer", "text")]
        for plan in plans:
            summary = run_intervention(plan, args.lake, batch_size=16, **quiet)
            print("\n".join(summary.lines()), flush=True)
    lake = open_lake(args.lake)
    print(f"\nall runs: {time.monotonic() - started:.0f}s\n")
    restoration = lake.sql(named_query("patch_restoration")).fetchall()
    knockout = lake.sql(named_query("knockout_effects")).fetchall()
    for toy in TOYS:
        mine = [r for r in restoration if r[0] == toy]
        best = max(mine, key=lambda r: r[3])
        print(
            f"{toy}: highest mean restoration {best[3]:+.3f} at site {best[1]}, layer {best[2]} (n={best[4]})"
        )
        last = max(r[2] for r in mine)
        inner = max((r for r in mine if (r[1], r[2]) != ("resid", last)), key=lambda r: r[3])
        print(
            f"{toy}: without the last layer's residual (an identity): {inner[3]:+.3f} at site {inner[1]}, "
            f"layer {inner[2]}"
        )
        hits = [r for r in knockout if r[0] == toy]
        for source in ("answer", "text"):
            worst = min((r for r in hits if r[1] == source), key=lambda r: r[4])
            print(
                f"{toy}: knockout from {source}: window {worst[2]} costs the most accuracy, "
                f"{100 * worst[4]:+.1f} pp (truth margin {worst[5]:+.3f}, n={worst[6]})"
            )


if __name__ == "__main__":
    main()
