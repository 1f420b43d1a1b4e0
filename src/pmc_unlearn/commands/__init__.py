"""CLI commands, one module each (see pmc_unlearn.cli)."""
