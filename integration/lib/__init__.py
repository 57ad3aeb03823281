"""Helpers shared by the Strait integration tests and the benchmark."""
