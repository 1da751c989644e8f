"""kc-harness: key-channel compression of attention.

Python API (the CLI maps onto these one-to-one):
    harness.run(method="drrqr", ratios=[0.5], suites=["ppl"])   # same as `harness run`
    harness.sweep("grid.yaml", executor="ray")                  # same as `harness sweep`
    harness.load_model("deltanet-tiny")
"""

__version__ = "0.1.0"


def run(*args, **kwargs):
    """Compress and evaluate; the twin of `harness run` (see harness.pipeline.run)."""
    from harness.pipeline import run as _run

    return _run(*args, **kwargs)


def sweep(*args, **kwargs):
    """Run a grid's missing cells, locally or on Ray; the twin of `harness sweep` (see harness.sweeps.sweep)."""
    from harness.sweeps import sweep as _sweep

    return _sweep(*args, **kwargs)


def load_model(*args, **kwargs):
    """Load a zoo model, a save_pretrained folder or a hub id (see harness.loader.load_model)."""
    from harness.loader import load_model as _load

    return _load(*args, **kwargs)


__all__ = ["__version__", "load_model", "run", "sweep"]
