"""Looking at runs: `qstar inspect`, iteration tables, plots, credit maps."""

