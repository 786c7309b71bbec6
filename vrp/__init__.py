"""VRP, the VLM Reliability Probe: capture once into an activation lake, analyse with SQL."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``vrp.open_lake`` without importing DuckDB/Polars/deltalake on every ``import vrp``."""
    if name == "open_lake":
        from vrp.lake import open_lake

        return open_lake
    raise AttributeError(f"module 'vrp' has no attribute {name!r}")
