"""Hypothesis profiles for the fuzz targets: a bounded run in `make test` (and CI), a long one in
`make fuzz`. HYPOTHESIS_PROFILE picks one; LCLSTREAM_FUZZ_EXAMPLES sizes the long run."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {"deadline": None, "database": None,
           "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("ci", max_examples=150, derandomize=True, **_COMMON)
settings.register_profile("fuzz", **_COMMON,
                          max_examples=int(os.environ.get("LCLSTREAM_FUZZ_EXAMPLES", "5000")))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
