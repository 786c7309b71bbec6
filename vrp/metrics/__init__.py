"""Signal definitions shared by capture and analysis (numpy only, no torch, no lake).

``vrp.metrics.attention``: ``normalise_map``, ``spatial_entropy(ies)``, ``cluster_count(s)``. Capture
computes them at ingest time; analyses recompute them on maps read from the lake. Neither room
imports the other for them (see docs/ARCHITECTURE.md section 3).
"""
