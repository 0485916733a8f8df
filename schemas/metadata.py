"""Arrow schema and field metadata keys.

Keys are bytes because Arrow metadata is bytes -> bytes; values are UTF-8 text (JSON where noted).
"""

# Schema-level keys.
EXPERIMENT = b"lclstream.experiment"
RUN = b"lclstream.run"  # decimal run number; a multi-run result carries RUNS instead
RUNS = b"lclstream.runs"  # JSON list of run numbers, in stream order
LAYOUT = b"lclstream.layout"  # "lcls2-smalldata" | "lcls1-smalldata" | "cxi" | "nxmx" | "euxfel"
EVENTS = b"lclstream.events"  # events in the run (before any event slice)
START_TIME = b"lclstream.start_time"  # ISO 8601 UTC of the first event
END_TIME = b"lclstream.end_time"  # ISO 8601 UTC of the last event
RUN_BYTES = b"lclstream.bytes"  # bytes of all event columns of the run, as served
CONFIG = b"lclstream.config"  # JSON: per-run configuration datasets (no event axis)
TABLE = b"lclstream.table"  # the table of the run served, when not its main one
TABLES = b"lclstream.tables"  # JSON list: the run's other tables (request field "table")
NXMX = b"nxmx"  # JSON: an NXmx run's beam and detector geometry, each {"value", "units"}
COMPRESSION = b"lclstream.compression"  # FlightInfo: what DoGet compresses with ("none", "zstd:3")

# Field-level keys.
HDF5_PATH = b"hdf5.path"  # the dataset the column is read from (links resolved)
UNITS = b"units"
DETECTOR = b"detector"  # top-level group of the dataset, e.g. "pnccd"
FILL_VALUE = b"hdf5.fill_value"  # the file's missing-value sentinel, served as null
DERIVED = b"lclstream.derived"  # how a derived column is computed

# Derived columns every run offers besides its datasets.
RUN_COLUMN = "run"
TIME_COLUMN = "time"

# Live streams (see schemas/live.py).
LIVE = b"lclstream.live"  # "true" on the schema of a stream still being acquired
STREAM = b"lclstream.stream"  # the stream's name
