"""Tests of the `fedsite` command front and end-to-end runs through it (deployment on loopback)."""
