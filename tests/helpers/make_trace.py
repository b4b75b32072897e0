"""Write a trace of a small known schedule: ``make_trace.py PATH [--dry-run]`` (any rank count).

4x6 mesh on wse2: a shift by +1 along x of a 5-element tile (phase "shift", one step), then
10 FLOPs on every core (phase "compute", one step).
"""
import sys
from pathlib import Path

from meshmpi import Mesh, cli, load_hardware
from meshmpi.trace import write_trace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # tests/: the shared schedule
from meshes import known_schedule  # noqa: E402


def main(argv):
    path = argv[0]
    mesh = Mesh(4, 6, load_hardware("wse2"), dry_run="--dry-run" in argv)
    known_schedule(mesh)
    write_trace(mesh, path, kind="helper", result={"answer": 42}, argv=["make_trace.py", path])
    mesh.free()
    return 0


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
