"""nightsift.engine: I/O, configuration, the stages of the chain, packaging, CLI, orchestration."""
