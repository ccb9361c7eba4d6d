"""In-process stand-ins for external services the runner talks to."""
