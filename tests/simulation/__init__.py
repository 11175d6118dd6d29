"""Deterministic simulation of the whole worker: see ``world`` for the seams and invariants."""
