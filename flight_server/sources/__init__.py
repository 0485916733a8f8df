"""Run sources: HDF5 files in the facilities' layouts, described and read as Arrow tables."""

from flight_server.sources.layouts import LAYOUTS, Layout
from flight_server.sources.reader import RunReader
from flight_server.sources.run import Run, describe

__all__ = ["LAYOUTS", "Layout", "Run", "RunReader", "describe"]
