"""The Dask cluster that jobs run on: an existing scheduler (`--dask-scheduler`, e.g. a
dask-jobqueue SLURMCluster on the data nodes), or an embedded LocalCluster of worker processes
started on first use, so that a server nobody submits to starts no processes."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
RETRY_AFTER_S = 5.0  # an unreachable scheduler is tried again this long after


class EngineUnavailable(RuntimeError):
    """No Dask cluster to run on now; the message says why. Jobs wait in the queue."""


class Engine:
    def __init__(self, scheduler: str | None, workers: int) -> None:
        self.scheduler = scheduler
        self.workers = workers
        self._lock = threading.Lock()
        self._client = None
        self._cluster = None
        self._failed: tuple[float, str] | None = None  # (when, why) of the last failed connect

    def describe(self) -> str:
        if self.scheduler:
            return f"the Dask scheduler at {self.scheduler}"
        return f"an embedded Dask LocalCluster of {self.workers} worker processes"

    def client(self):
        """The connected distributed.Client; EngineUnavailable when there is none (retried no
        more often than every RETRY_AFTER_S)."""
        with self._lock:
            if self._client is not None and self._client.status == "running":
                return self._client
            if self._failed and time.monotonic() - self._failed[0] < RETRY_AFTER_S:
                raise EngineUnavailable(self._failed[1])
            try:
                self._client = self._connect()
                self._failed = None
                return self._client
            except Exception as exc:  # whatever the cause, the jobs wait and say why
                why = f"waiting for {self.describe()}: {type(exc).__name__}: {exc}"
                log.warning("jobs: %s", why)
                self._failed = (time.monotonic(), why)
                raise EngineUnavailable(why) from None

    def _connect(self):
        import dask
        from distributed import Client, LocalCluster

        if self.scheduler:
            return Client(self.scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        if self._cluster is None:
            log.info("jobs: starting %s", self.describe())
            # The scheduler's HTTP server (health, Prometheus metrics, the dashboard when
            # bokeh is installed) on a free loopback port: never a clash with another Dask.
            # Measured on peak finding: Dask's default MALLOC_TRIM_THRESHOLD_ makes glibc map
            # and fault in every batch's temporary arrays anew, and its profiler samples every
            # thread each 10 ms; together ~15% of the workers' CPU. Neither is needed here.
            environ = {**dask.config.get("distributed.nanny.pre-spawn-environ"),
                       "MALLOC_TRIM_THRESHOLD_": None}
            with dask.config.set({"distributed.worker.profile.enabled": False,
                                  "distributed.nanny.pre-spawn-environ": environ}):
                self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=2,
                                             processes=True, host="127.0.0.1",
                                             dashboard_address="127.0.0.1:0",
                                             scheduler_port=0)
            log.info("jobs: Dask scheduler %s, HTTP (health, metrics) at %s",
                     self._cluster.scheduler_address, self._cluster.dashboard_link)
        return Client(self._cluster, set_as_default=False)

    def close(self) -> None:
        with self._lock:
            client, cluster, self._client, self._cluster = self._client, self._cluster, None, None
        for part in (client, cluster):
            if part is not None:
                try:
                    part.close()
                except Exception as exc:  # stopping anyway: say so, go on
                    log.warning("jobs: closing the Dask %s: %s", type(part).__name__, exc)
