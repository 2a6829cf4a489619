"""Test helpers that ship with the package (the differential fuzz case generator)."""
