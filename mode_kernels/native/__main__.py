"""python -m mode_kernels.native build: compile the native CPU kernels now (with the compiler's output)."""
import argparse
import sys

from .build import build, cache_root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mode_kernels.native", description=__doc__)
    parser.add_argument("command", choices=("build",))
    parser.parse_args(argv)
    build(verbose=True)
    print(f"mode_kernels.native: ready (cache {cache_root()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
