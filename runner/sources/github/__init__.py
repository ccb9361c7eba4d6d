"""The GitHub source: a GitHub App's triggers confirmed through the API, run and reported as check runs.

Its modules by role, in the same order as the Buildkite source's:

- client: `client` (the REST client every other module talks through; its docstring lists the
  API) and `appauth` (the app's JWT and its installation tokens);
- intake: `intake` (triggers taken, confirmed and recorded once), `poller` (poll mode) and
  `gateway_client` (gateway mode: the webhook gateway's deliveries);
- confirm: `confirm` (what a trigger claims, read through the API with the app's own credentials);
- translate: `translate` (whether a trigger runs, as which identity and at which SHA) and
  `jobsfile` (the jobs of a repository's `.hpc-runner.toml`);
- checkout: `checkout` (the commit fetched with the installation token, for that fetch only);
- report: `report` (what GitHub is told about a job, and when) and `checks` (the check run and
  commit status calls);
- state: `state` (triggers, runs and polling cursors, across restarts);
- source: `source` (the parts wired together) and `runs` (a trigger's jobs, each to its one final
  report).
"""
