"""One module per `hpc-runner` subcommand: each adds its parser and runs it."""
