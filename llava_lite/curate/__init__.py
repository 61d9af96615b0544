"""Curating instruction data: dedup, tag, rate, select - one module per job."""
