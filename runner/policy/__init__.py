"""The capability policy: who may spend which shared project account's resources.

`model` reads and validates policy files; `engine.decide` is the pure decision.
"""

from runner.policy.engine import Decision, SlurmResources, Usage, decide, waits_for_a_place
from runner.policy.model import Account, Grant, Image, Policy, load_policy, parse_policy_text

__all__ = ["Account", "Decision", "Grant", "Image", "Policy", "SlurmResources", "Usage", "decide",
           "load_policy", "parse_policy_text", "waits_for_a_place"]
