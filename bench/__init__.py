"""Benchmarks of the LCLStream Flight server: `python -m bench` (see README.md).

The benchmark client reads the same gigabyte again and again. Arrow's default allocator
(mimalloc) hands freed memory back to the OS after a second, so each read would page-fault its
gigabyte anew: a cost of the client machine (on VMs up to seconds per GiB), not of the server
under test, and one that varies with the gap between reads. The client process therefore keeps
freed memory for reuse; this must be set before pyarrow loads, hence here. Servers are started
without it (see `common.ServerProcess`).
"""

import os

_CLIENT_ENV = {"MIMALLOC_PURGE_DELAY": "-1"}
SET_FOR_CLIENT = [k for k in _CLIENT_ENV if k not in os.environ]
os.environ.update({k: _CLIENT_ENV[k] for k in SET_FOR_CLIENT})
