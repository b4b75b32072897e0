"""Benchmarks (filled in below)."""


def register(sub):
    pass
