"""Deciding whether a job may run: signatures on the steps that CI services hand us."""
