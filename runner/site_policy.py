"""The policy an agent or `hpc-runner run` works under, checked against this site's config."""

from __future__ import annotations

from runner.config import AgentConfig, check_policy_against_site
from runner.embedded import ensure_embedded_policy
from runner.errors import InputError
from runner.policy import Policy, load_policy


def load_site_policy(config: AgentConfig, *, explicit: str | None = None) -> Policy:
    """The policy to run under: --policy, else the config's, else the embedded default.

    A policy whose grants would bind the agent's state or secrets into jobs is refused here,
    whatever the policy file itself says.
    """
    if explicit:
        policy = load_policy(explicit)
    elif config.policy is not None:
        policy = load_policy(config.policy)
    else:
        policy = load_policy(ensure_embedded_policy(config))
    problems = check_policy_against_site(policy, config)
    if problems:
        raise InputError("; ".join(problems), file=policy.source)
    return policy
