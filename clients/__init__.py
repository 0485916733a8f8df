"""Python client for LCLStream Flight: experiment runs as Arrow, Polars, Pandas and NumPy."""

from clients.client import DEFAULT_LOCATION, Client, connect
from clients.convert import array_to_numpy, column_to_numpy, to_pandas, to_polars
from clients.jobs import Job, JobFailed
from clients.sql import adbc_connect

__all__ = [
    "DEFAULT_LOCATION",
    "Client",
    "Job",
    "JobFailed",
    "adbc_connect",
    "array_to_numpy",
    "column_to_numpy",
    "connect",
    "to_pandas",
    "to_polars",
]
