"""qstar's single controller: the CLI, config schema, the loop and its stages (see README, "How it fits together")."""
