"""Shared test helpers: tiny random models, sequence-parallel test programs."""
