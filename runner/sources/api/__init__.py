"""The API source: jobs submitted to the hub's REST API, leased by this agent, verified here, run and
published back to the hub.

Its modules by role, in the same order as the other sources':

- client: `client` (the hub's agent endpoints for API jobs, over the shared `jobs_protocol`);
- intake: `intake` (the long-poll lease loop, at most as many jobs in flight as the agent takes);
- confirm: `confirm` (the forwarded OIDC token verified by this agent against its own `[[oidc]]`
  issuers, as of when the hub received it, and the job's digest binding);
- translate: `translate` (the leased job object as a job spec, read as the hub and `policy
  explain` read it, with the token's identity, repository and commit);
- checkout: `checkout` (the token's repository at its commit, into the job's own directory);
- report: `report` (the job's states and its log, posted to the hub from the offset kept);
- state: `state` (what is remembered of each job taken, in `api.sqlite`);
- source: `source` (each job from its lease to its one final state at the hub).

Beside the source, for an agent with `hub_url`: `publish` (every job of the agent's other sources
registered at the hub and published through `report`) and `published` (how far each got, in
`published.sqlite`).
"""
