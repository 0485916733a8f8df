"""Archived runs: a request planned into endpoints (`planning`), and the service that answers
GetFlightInfo, GetSchema, DoGet and ListFlights for them (`service`)."""
