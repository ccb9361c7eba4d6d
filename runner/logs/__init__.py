"""Job logs: `tail` follows a growing log file byte for byte (into a sink), `redact` hides secrets
in it before a source sends it on."""
