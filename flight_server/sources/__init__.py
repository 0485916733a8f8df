"""Run sources: HDF5 files in the facilities' layouts, described and read as Arrow tables, and
the read path that streams them (`streaming`: read-ahead on the pool; `ranges`: event-range
arithmetic)."""

from flight_server.sources.layouts import LAYOUTS, Layout
from flight_server.sources.reader import RunReader
from flight_server.sources.run import Run, describe

__all__ = ["LAYOUTS", "Layout", "Run", "RunReader", "describe"]
