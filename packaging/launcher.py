"""What the one-file `sn1-gateway` executable runs: the console script `engine.cli:main`.

A frozen program has no interpreter to run `python -m MODULE`, yet `sn1-gateway bench` starts its
children that way (`sys.executable -m engine.cli ...`, `-m bench.floor`), and in the executable
`sys.executable` is the executable itself. So `sn1-gateway -m MODULE ARGS...` runs a bundled module
as `python -m` would; anything else is the ordinary command line.
"""

from __future__ import annotations

import importlib.util
import runpy
import sys


def launch(argv: list[str]) -> int:
    if getattr(sys, "frozen", False) and len(argv) >= 3 and argv[1] == "-m":
        module = argv[2]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            print(f"{argv[0]}: No module named {module}", file=sys.stderr)
            return 1
        sys.argv = [module, *argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    from engine.cli import main

    return main(argv[1:])


if __name__ == "__main__":
    sys.exit(launch(sys.argv))
