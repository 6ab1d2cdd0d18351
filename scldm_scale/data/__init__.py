"""Cells in: reading, validating and batching raw counts behind one `CellBatch` interface."""
