"""benchmarks/gpu.py runs where the lake stack is missing, and its real-size configs are the published ones.

The GPU machine has torch and transformers but no deltalake, duckdb or polars; the script blocks
those on import, so its smoke run here (tiny configs on the CPU, the same code path) proves it
never needs them. The real-size configs are checked on the meta device against the published
parameter counts and image-token counts of each checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_smoke_without_lake_libraries(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = str(ROOT / "benchmarks" / "gpu.py")
    cmd = [sys.executable, script, "--smoke", "--families", "llava,qwen2vl,gemma3"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())

    configs = {row["family"]: row for row in report["real_configs"]}
    assert configs["llava"]["params"] == configs["llava"]["published_params"] == 7_063_427_072
    assert configs["llava"]["image_tokens"] == [576, 576] and configs["llava"]["layers"] == 32
    assert configs["qwen2vl"]["params"] == 8_291_375_616
    # a 640x480 picture: smart_resize to 476x644, merged 2x2 -> 17x23 tokens
    assert configs["qwen2vl"]["grid"] == [17, 23] and configs["qwen2vl"]["layers"] == 28
    assert configs["gemma3"]["params"] == 4_300_079_472
    assert configs["gemma3"]["image_tokens"] == [256, 256] and configs["gemma3"]["layers"] == 34

    blocks = {(b["family"], b["batch"]): b for b in report["blocks"]}
    assert set(blocks) == {(f, b) for f in ("llava", "qwen2vl", "gemma3") for b in (1, 2)}
    for block in blocks.values():
        for name, row in block["variants"].items():
            assert row["error"] is None, (name, row["error"])
            assert row["median_s"] > 0 and len(row["times"]) == 1
        assert block["ratios"]["vrp/greedy"] > 0
    probed = {(p["family"], p["batch"], p["variant"]) for p in report["probes"]}
    assert ("llava", 3, "prefill") in probed and ("llava", 4, "eager") in probed
    assert ("llava", 4, "prefill") not in probed
    assert "| vrp_sc |" in done.stdout
