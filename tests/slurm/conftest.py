"""tests/slurm: the `slurm` marker lets other suites leave the real-SLURM test out (-m "not slurm")."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: submits jobs to a real one-node SLURM (root, minutes)")
