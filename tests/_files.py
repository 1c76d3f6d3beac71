"""Writing test inputs in each file format the CLIs read."""

from __future__ import annotations

import json

import numpy as np


def write_loads(path, loads: np.ndarray, json_key: str | None = None) -> None:
    """Save ``loads`` to ``path`` in the format its suffix names (.npy, .csv or .json; a JSON file
    holds the bare list, or ``{json_key: list}``)."""
    fmt = str(path).rsplit(".", 1)[-1]
    if fmt == "npy":
        np.save(path, loads)
    elif fmt == "csv":
        np.savetxt(path, loads, delimiter=",")
    elif fmt == "json":
        data = loads.tolist()
        with open(path, "w") as f:
            json.dump({json_key: data} if json_key else data, f)
    else:
        raise ValueError(f"write_loads: unknown suffix {fmt!r}")
