"""Errors raised by the emulator. Each one maps to a one-line message and a non-zero exit."""


class MeshmpiError(Exception):
    """Base class. ``collective`` is True when every rank raises the same error at once,
    so the job can end cleanly (rank 0 prints, all exit) instead of aborting."""

    collective = False


class UsageError(MeshmpiError):
    """Bad input from the user: arguments, files, shapes. Raised identically on every rank."""

    collective = True


class LocalityError(MeshmpiError):
    """A rank tried to talk to a rank that is not its Cartesian neighbour (PLMR: L)."""


class CoreMemoryError(MeshmpiError):
    """A core's resident bytes exceeded the profile's SRAM (PLMR: M)."""

    collective = True


class RoutingError(MeshmpiError):
    """A router needs more routes than the profile allows (PLMR: R)."""

    collective = True


class LayoutError(MeshmpiError):
    """An operand is not laid out the way a kernel expects (layouts are global, so every rank
    raises it at once)."""

    collective = True


class CheckError(MeshmpiError):
    """A numeric run disagrees with its independent reference, or produced NaN or infinity
    (raised identically on every rank)."""

    collective = True


class HazardError(MeshmpiError):
    """A kernel used a buffer in flight: it touched a transfer's destination before ``wait``, or
    wrote its source between ``start`` and ``wait`` (an overlap bug the wafer would not forgive)."""
