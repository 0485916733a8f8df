"""A real PostgreSQL server for the cluster tests: Debian's `postgresql` package (the Makefile
installs it as root), a fresh cluster in a temporary directory on a free loopback port, run as
the `postgres` system user when the tests run as root (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from tests.helpers import free_port


def _bindir() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not candidates:
        raise RuntimeError("PostgreSQL is not installed: `make test` installs it as root "
                           "(sudo apt-get install -y postgresql)")
    return Path(candidates[-1]).parent


class Postgres:
    """In a directory of its own under the system's temp dir: the `postgres` user must be able
    to reach it, which it cannot inside pytest's private temp dirs."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lclstream-pg-"))
        self.data = self.root / "pgdata"
        self.port = free_port()
        self.bin = _bindir()
        self.as_root = os.geteuid() == 0
        self._databases = itertools.count()

    @property
    def url(self) -> str:
        return f"postgresql://lclstream@127.0.0.1:{self.port}/lclstream"

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)

    def init(self) -> Postgres:
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "lclstream", "--auth=trust",
                  "--no-sync", "-E", "UTF8")
        self.start()
        with psycopg.connect(f"postgresql://lclstream@127.0.0.1:{self.port}/postgres",
                             autocommit=True) as con:
            con.execute("CREATE DATABASE lclstream")
        return self

    def database(self) -> str:
        """The URL of a new, empty database of this server: state no other test has seen."""
        name = f"fresh{next(self._databases)}"
        with psycopg.connect(self.url, autocommit=True) as con:
            con.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                  "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                  "-c fsync=off", "start")
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(f"postgresql://lclstream@127.0.0.1:{self.port}/postgres").close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(self.root, ignore_errors=True)
