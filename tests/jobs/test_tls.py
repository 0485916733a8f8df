"""Jobs on a mutual-TLS server that binds tokens to certificates: the workers trust the CA,
present the certificate they are given, and produce with the job's token."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients import connect
from flight_server.security import certs
from flight_server.security.grants import Grants
from tests.helpers import LCLS2_EXP, start_server
from tests.jobs.conftest import JOB_SETTINGS, SMALL_RUN


@pytest.mark.slow  # a server with its own Dask cluster: ~5 s
def test_jobs_run_on_a_mutual_tls_server(jobs_data: Path, tmp_path: Path) -> None:
    pki = certs.make(tmp_path / "pki", client_name="alice")
    srv = start_server(jobs_data, host="localhost", tls_cert=pki["server_cert"],
                       tls_key=pki["server_key"], tls_client_ca=pki["ca"],
                       bind_token_to_certificate=True, state_dir=tmp_path / "state",
                       jobs_database=tmp_path / "jobs.sqlite", job_tls_roots=pki["ca"],
                       job_tls_cert=pki["client_cert"], job_tls_key=pki["client_key"],
                       **JOB_SETTINGS)
    try:
        token = srv.security.minter.mint("alice", Grants.build(read=["*"], write=["*"]), 600)
        with connect(f"grpc+tls://localhost:{srv.port}", token, tls_root_certs=pki["ca"],
                     cert_chain=pki["client_cert"], private_key=pki["client_key"]) as c:
            job = c.submit(LCLS2_EXP, SMALL_RUN, ["gmd/energy"], into=(LCLS2_EXP, "over-mtls"))
            status = job.wait(timeout=120, progress=False)
            assert status["progress"]["events"] == 200
            assert job.read().column("gmd/energy").equals(
                c.read(LCLS2_EXP, SMALL_RUN, ["gmd/energy"]).column("gmd/energy"))
    finally:
        srv.shutdown()
