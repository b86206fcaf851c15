"""Files: reading inputs (one place for every check), atomic outputs."""
