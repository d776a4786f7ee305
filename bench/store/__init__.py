"""Files on disk: run directories, safe file writes, the kernel store (the lowest layer of bench)."""
