"""tests/slurm: the `slurm` marker lets other suites leave the real-SLURM test out."""


def pytest_configure(config):
    # e.g. `pytest -m "not slurm" tests` for a fast serial run
    config.addinivalue_line("markers", "slurm: submits jobs to a real one-node SLURM (root)")
