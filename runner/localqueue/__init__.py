"""The embedded local queue: `submit`, `status`, `logs` and `cancel` over a Unix socket.

The submitter's identity comes from the socket's peer credentials (SO_PEERCRED), never
from the request.
"""
