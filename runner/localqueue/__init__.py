"""The embedded local queue: `submit`, `status`, `logs` and `cancel` over a Unix socket.

The submitter's identity comes from the socket's peer credentials (SO_PEERCRED), never
from the request. So does the viewer's on the agent's dashboard (`web`), a socket of its own.
"""
