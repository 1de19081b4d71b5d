"""Running a loop: run directory and manifest, atomic writes, workers, tracking, progress bars."""

