"""Tests of `simulations/`."""
