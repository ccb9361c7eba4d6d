"""What ran: a job's declared outputs collected and digested, the facts of its run, and its
provenance record (an in-toto Statement with a SLSA provenance predicate), stored once, never changed."""
