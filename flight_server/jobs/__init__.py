"""Data requests as jobs: a request produced into a live stream on the facility's compute,
tracked and persisted (`store`: the job table). The protocol is in schemas/jobs.py."""
