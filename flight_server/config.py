"""Settings: built-in defaults < TOML file < LCLSTREAM_* environment variables < CLI flags.

The bottom layer: it imports nothing of the project's, so that every part can read settings."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

ENV_PREFIX = "LCLSTREAM_"


@dataclass(frozen=True)
class LiveSettings:
    """What a live stream needs of the settings (see `Settings.live`)."""

    fsync: str = "interval"  # "batch": sync before each ack; "interval": every fsync_interval
    fsync_interval: float = 0.01
    segment_bytes: int = 64 << 20
    ring_bytes: int = 256 << 20
    retention_bytes: int = 16 << 30
    retention_seconds: float = 24 * 3600.0
    wait_poll: float = 0.25  # how often a waiting consumer checks whether its client left




@dataclass(frozen=True)
class Settings:
    data: Path = Path("demo-data")
    host: str = "127.0.0.1"
    port: int = 8815
    batch_bytes: int = 4 * 1024 * 1024  # measured best on loopback; 16 MiB was 2x slower
    first_batch_bytes: int = 1024 * 1024  # small first batch: low time-to-first-batch
    partition_bytes: int = 256 * 1024 * 1024  # one FlightEndpoint per this many bytes of a run
    prefetch: int = 2  # batches read ahead per stream
    read_threads: int = 8  # HDF5 reads in flight across all streams
    # xtc2 runs: fetch detectors' calibration constants from the LCLS calibration database (off:
    # none, as psana's skip_calib_load="all", for servers that cannot reach it)
    psana_calibration: bool = False
    # on the wire: "auto" (off for loopback peers, zstd for others), "none", "zstd", "lz4",
    # "zstd:LEVEL"; a request may choose its own
    compression: str = "auto"
    request_memory: int = 512 * 1024 * 1024  # one stream's batches in flight (read + processed)
    log_level: str = "INFO"
    log_file: Path | None = None  # the server's log, rotated by size (else stderr only)
    log_max_bytes: int = 64 * 1024 * 1024  # rotate the log and the audit file past this size
    log_backups: int = 5  # rotated files kept of each
    # Prometheus /metrics and /healthz over HTTP on this port of `host` (0: a free one; None:
    # off); see README "Metrics"
    metrics_port: int | None = None
    # -- security (see README "Security") --
    auth: bool = True  # False only with --no-auth, and then only on loopback
    state_dir: Path | None = None  # server secrets; default <data>/.lclstream
    users_file: Path | None = None  # password login; default <state_dir>/users.json
    token_issuer: str = "lclstream"  # `iss` of the tokens this server signs
    token_audience: str = "lclstream"  # `aud` this server accepts (and puts in its own tokens)
    token_algorithm: str = "HS256"  # or EdDSA
    token_ttl: int = 8 * 3600  # seconds a password login's token lasts
    leeway: int = 30  # seconds of clock skew tolerated on exp/nbf/iat
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a certificate it signed
    bind_token_to_certificate: bool = False  # token sub must equal the client certificate's name
    audit_log: Path | None = None  # also write audit lines to this file
    issuers: tuple[dict[str, Any], ...] = ()  # [[issuer]] tables of the settings file
    # -- SQL (see README "SQL and BI tools") --
    sql_timeout: int = 300  # seconds of engine time per query (waiting for the client is free)
    sql_memory_limit: str = "2GB"  # per query
    sql_threads: int = 2  # DuckDB threads per query
    sql_spill_limit: str = "1GB"  # disk a query may spill to beyond its memory, per query
    # -- live streams (see README "Live streams") --
    live_fsync: str = "interval"  # "interval": sync every live_fsync_interval; "batch": each batch
    live_fsync_interval: float = 0.01  # seconds; short keeps the disk writing steadily
    live_segment_bytes: int = 64 * 1024 * 1024  # log file size; retention drops whole segments
    live_ring_bytes: int = 256 * 1024 * 1024  # recent batches kept in memory per stream
    live_retention_bytes: int = 16 * 1024**3  # per stream, unless its producer sets its own
    live_retention_seconds: float = 24 * 3600.0
    # -- data-request jobs (see README "Data requests and jobs") --
    jobs_database: Path | None = None  # the job table; default <state_dir>/jobs.sqlite
    dask_scheduler: str | None = None  # a Dask scheduler's address; None: an embedded LocalCluster
    job_workers: int = 2  # worker processes of the embedded LocalCluster
    job_limit: int = 8  # queued plus running jobs per user
    jobs_running: int = 4  # jobs that run at once; the rest wait in the queue, oldest first
    job_partition_bytes: int = 64 * 1024 * 1024  # source bytes per task: the unit of retry
    job_retries: int = 2  # a task's retries after an error (a lost worker is re-run by Dask)
    job_server_location: str | None = None  # how workers reach this server; default: its own
    job_tls_roots: Path | None = None  # CA workers trust for job_server_location; default tls_cert
    job_tls_cert: Path | None = None  # the certificate workers present to a mutual-TLS server
    job_tls_key: Path | None = None  # and its private key
    # -- cluster (see README "Running a cluster") --
    cluster: bool = False  # one of several nodes over the same data root and state
    state_url: str | None = None  # postgresql://...: the state the nodes share
    advertise: str | None = None  # this node's location as clients reach it; default its own
    heartbeat_s: float = 1.0  # how often a node says it is alive
    node_timeout_s: float = 5.0  # a node silent this long leaves every new plan

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def location(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'grpc+tls' if self.tls else 'grpc'}://{host}:{self.port}"

    def state_path(self) -> Path:
        return self.state_dir if self.state_dir is not None else self.data / ".lclstream"

    def live(self) -> LiveSettings:
        if self.live_fsync not in ("interval", "batch"):
            raise ValueError(f"live_fsync must be 'interval' or 'batch', got {self.live_fsync!r}")
        return LiveSettings(self.live_fsync, self.live_fsync_interval, self.live_segment_bytes,
                            self.live_ring_bytes, self.live_retention_bytes,
                            self.live_retention_seconds)

    def jobs_path(self) -> Path:
        return self.jobs_database or self.state_path() / "jobs.sqlite"

    def users_path(self) -> Path:
        return self.users_file if self.users_file is not None else self.state_path() / "users.json"


def parse_size(text: str) -> int:
    """'4MiB', '256M', '1GiB', '4G' or a plain byte count: sizes read the same in flags,
    settings and the benchmarks' options."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE | FALSE:
        return text in TRUE
    raise ValueError(value)


def _coerce(name: str, value: Any) -> Any:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    try:
        if kind == "Path | None":
            return None if value in (None, "") else Path(value)
        if kind == "Path":
            return Path(value)
        if kind == "str | None":
            return None if value in (None, "") else str(value)
        if kind == "int":
            return int(value)
        if kind == "int | None":
            return None if value in (None, "") else int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            return _bool(value)
        if kind.startswith("tuple"):
            return tuple(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"setting '{name}' must be {kind}, got {value!r}") from None


def _issuer_tables(doc: dict[str, Any], base: Path) -> list[dict[str, Any]]:
    """`[[issuer]]` tables, with key file paths taken relative to the settings file."""
    tables = doc.pop("issuer", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ValueError("'issuer' must be an array of tables: [[issuer]]")
    resolved = []
    for table in tables:
        table = dict(table)
        for key in ("secret_file", "public_key_file", "jwks_file"):
            if key in table:
                table[key] = str(base / table[key])
        resolved.append(table)
    return resolved


def load(config_file: Path | None = None, overrides: dict[str, Any] | None = None,
         environ: dict[str, str] | None = None) -> Settings:
    """Merge the sources in order of precedence; unknown keys are errors, not silently ignored."""
    names = {f.name for f in fields(Settings)}
    values: dict[str, Any] = {}
    if config_file is not None:
        with open(config_file, "rb") as fh:
            doc = tomllib.load(fh)
        issuers = _issuer_tables(doc, config_file.parent)
        doc = dict(doc.get("server", doc))
        issuers += _issuer_tables(doc, config_file.parent)
        if issuers:
            doc["issuers"] = issuers
        unknown = set(doc) - names
        if unknown:
            raise ValueError(f"unknown settings in {config_file}: {sorted(unknown)}; "
                             f"known: {sorted(names)}")
        values.update(doc)
    env = os.environ if environ is None else environ
    for name in names - {"issuers"}:  # issuers are tables: settings file only
        if ENV_PREFIX + name.upper() in env:
            values[name] = env[ENV_PREFIX + name.upper()]
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return replace(Settings(), **{k: _coerce(k, v) for k, v in values.items()})
