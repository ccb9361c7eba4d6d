"""The GitHub webhook gateway: receives GitHub's webhooks where GitHub can reach it, keeps them in a
durable queue, and hands them to agents that poll it over outbound connections.

`signature` and `webhook` decide about an incoming webhook, `tokens` authenticates agents,
`queue` is the SQLite queue with leases, `protocol` is the wire contract the agents' client shares,
and `server` is the aiohttp application that joins them.
"""
