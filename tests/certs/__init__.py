"""Tests of `certs/`."""
