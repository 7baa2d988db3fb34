"""``python -m sn_cuda COMMAND [ARGS]``: a thin dispatcher to the subcommands' own ``main``.

    bench     time spectral norm, torch vs sn_cuda, on public model shapes (sn_cuda.bench)
    inspect   the spectral norms stored in a checkpoint (sn_cuda.inspect)
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module holding main(argv), one-line help)
COMMANDS = {
    "bench": ("sn_cuda.bench", "time spectral norm (forward+backward) with torch's flavours and sn_cuda"),
    "inspect": ("sn_cuda.inspect", "inspect the spectral-normalized layers of a model"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m sn_cuda",
        description="sn_cuda command line. COMMAND --help shows a command's options.",
        epilog="commands:\n" + "\n".join(f"  {c:<9} {h}" for c, (_, h) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=tuple(COMMANDS), metavar="COMMAND")
    # Only the command is parsed here; everything after it (--help included) is the command's.
    ns = parser.parse_args(argv[:1])
    module = importlib.import_module(COMMANDS[ns.command][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
