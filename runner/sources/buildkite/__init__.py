"""The Buildkite source: jobs taken as an agent of Buildkite's agent API, verified, run and reported.

Its modules by role, in the same order as the GitHub source's:

- client: `protocol` (the agent API's requests, answers and retry rules, without I/O) and `client`
  (an agent session that sends them);
- intake: `intake` (what an accepted job must be before anything of the agent reads it);
- confirm: `signature` (the step's signature verified against the keys), `signature_keys`
  (reading those keys from the JWKS file) and `confirm` (a pull request build confirmed on GitHub);
- translate: `translate` (the job as an identity, a job spec and its env);
- checkout: `checkout` (the job's commit checked out on this node, on the ref it claims);
- report: `report` (the job's log streamed to Buildkite, resumably) and `chunks` (cutting it into
  the chunks Buildkite takes);
- state: `state` (what is remembered of each accepted job, so a restart loses nothing);
- source: `source` (the agent sessions, and each job from its accept to its one finish).
"""
