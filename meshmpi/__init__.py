"""meshmpi: an MPI emulator of a wafer-scale chip (PLMR model) for WaferLLM-style inference.

The runtime: :class:`Mesh` (cores over a Cartesian communicator), :class:`MeshArray`
(one tile per core), the fabric (the only way data moves), PLMR accounting, modeled clocks
and HDF5 traces. Only this package imports mpi4py.
"""
from importlib.metadata import PackageNotFoundError, version

from .array import MeshArray
from .errors import (CheckError, CoreMemoryError, HazardError, LocalityError, MeshmpiError, RoutingError,
                     UsageError)
from .hardware import Hardware, load_hardware
from .mesh import Mesh, parse_grid
from .threads import share_cores

try:
    __version__ = version("meshmpi")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"


def mpi_library_version() -> str:
    from mpi4py import MPI
    return " ".join(MPI.Get_library_version().strip().splitlines()[0].split())


__all__ = ["Mesh", "MeshArray", "Hardware", "load_hardware", "parse_grid", "MeshmpiError", "CheckError", "HazardError",
           "UsageError", "LocalityError", "CoreMemoryError", "RoutingError", "__version__",
           "mpi_library_version", "share_cores"]
