"""The contract shared by the server and its clients.

Arrow metadata keys, the v1 request (Flight command descriptor) and the v1 ticket format. Nothing
here imports the server, so clients can depend on it alone.
"""

from schemas.request import Request, RequestError, Ticket, parse_request, parse_ticket

__all__ = ["Request", "RequestError", "Ticket", "parse_request", "parse_ticket"]
