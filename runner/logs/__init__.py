"""Job logs: following a growing log file and cutting it into lines for the reporters."""
