"""What BYTE_STREAM_SPLIT saves over PLAIN for the lake's float columns (both with zstd level 1).

    .venv/bin/vrp ingest run --model toy-llava --limit 200 --lake /tmp/enc-lake   # (and the other toys)
    .venv/bin/python benchmarks/float_encoding.py /tmp/enc-lake

Every table of the lake is read at its committed version and written twice into a scratch folder
through the lake's own writer settings (``vrp.lake.delta.writer_properties``), once per float
encoding; the script prints the bytes of each table both ways, and the time each write took.
The lake writes PLAIN (``FLOAT_ENCODING``): Spark's default vectorized Parquet reader before 4.3
rejects byte-stream-split pages, and this measures the price of that choice.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

from deltalake import DeltaTable, write_deltalake

from vrp.lake import open_lake
from vrp.lake.delta import writer_properties
from vrp.schema import TABLES

ENCODINGS = ("PLAIN", "BYTE_STREAM_SPLIT")


def _bytes(path: str) -> int:
    actions = DeltaTable(path).get_add_actions(flatten=True)
    return int(sum(actions.column("size_bytes").to_pylist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lake", help="a lake to measure (it is only read)")
    args = parser.parse_args()
    lake = open_lake(args.lake)
    print(f"lake {lake.root}; {platform.processor() or platform.machine()}, zstd level 1")
    header = (
        f"{'table':16s} {'rows':>8s} " + " ".join(f"{e:>18s}" for e in ENCODINGS) + f" {'BSS saves':>10s}"
    )
    print(header)
    totals = dict.fromkeys(ENCODINGS, 0)
    seconds = dict.fromkeys(ENCODINGS, 0.0)
    with tempfile.TemporaryDirectory(prefix="vrp-encoding-") as scratch:
        for name, spec in TABLES.items():
            if not lake.has_table(name):
                continue
            data = lake.arrow(name).cast(spec.schema.remove_metadata())
            if data.num_rows == 0:
                continue
            sizes = {}
            for encoding in ENCODINGS:
                target = str(Path(scratch) / encoding / name)
                started = time.perf_counter()
                write_deltalake(
                    target,
                    data,
                    partition_by=list(spec.partition_by) or None,
                    writer_properties=writer_properties(spec, float_encoding=encoding),
                )
                seconds[encoding] += time.perf_counter() - started
                sizes[encoding] = _bytes(target)
                totals[encoding] += sizes[encoding]
            saving = 1 - sizes["BYTE_STREAM_SPLIT"] / sizes["PLAIN"]
            cells = " ".join(f"{sizes[e]:>18,d}" for e in ENCODINGS)
            print(f"{name:16s} {data.num_rows:>8d} {cells} {saving:>9.1%}")
    saving = 1 - totals["BYTE_STREAM_SPLIT"] / totals["PLAIN"]
    cells = " ".join(f"{totals[e]:>18,d}" for e in ENCODINGS)
    print(f"{'total':16s} {'':>8s} {cells} {saving:>9.1%}")
    print("write time: " + ", ".join(f"{e} {seconds[e]:.2f} s" for e in ENCODINGS))


if __name__ == "__main__":
    main()
