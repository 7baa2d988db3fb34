"""``python -m sn_cuda bench``: argument parsing, suite selection, output files."""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from . import report
from .methods import METHODS
from .run import DTYPES, Settings, print_progress, run
from .suites import STANDARD, Suite, all_suites, get_suite

__all__ = ["main", "build_parser", "select_suites", "QUICK_CPU_MAX_PARAMS"]

# --quick on a CPU runs only suites up to this many parameters (unless named with --suite).
QUICK_CPU_MAX_PARAMS = 4_000_000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sn_cuda bench",
        description="Time spectral norm (forward + backward, every layer of a model) with torch's "
        "flavours and with sn_cuda, on public model shapes. Progress goes to stderr, the markdown "
        "table to stdout.",
    )
    p.add_argument("--suite", nargs="+", action="extend", metavar="NAME",
                   help=f"suites to run (default: {' '.join(STANDARD)}); see --list")
    p.add_argument("--list", action="store_true", help="list the suites and exit")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present, else cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--quick", action="store_true",
                   help="few repeats; on a CPU only the small standard suites and a smaller end-to-end batch")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON (schema in sn_cuda/bench/report.py)")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the speedups (needs matplotlib)")
    p.add_argument("--method", nargs="+", action="extend", choices=METHODS, dest="methods",
                   metavar="METHOD", help=f"methods to run, of: {' '.join(METHODS)} (default: all)")
    p.add_argument("--repeats", type=int, help="timed repeats per measurement")
    p.add_argument("--warmup", type=int, help="untimed calls before the repeats")
    p.add_argument("--e2e-batch", type=int,
                   help="real (and fake) images per end-to-end SNGAN D step (default 64; 2 with --quick on CPU)")
    return p


def _list_suites() -> str:
    rows = ["  name                          layers      params  title"]
    for name, s in all_suites().items():
        mark = "*" if s.standard else " "
        rows.append(f"{mark} {name:<30}{len(s.layers):6d} {s.numel:11,d}  {s.title}")
    rows.append("* standard suite (run when no --suite is given)")
    return "\n".join(rows)


def select_suites(names: list[str] | None, quick: bool, device: torch.device) -> list[Suite]:
    """The suites named (KeyError for an unknown one), else the standard ones; --quick on a
    CPU drops the large standard suites (named ones always run)."""
    if names:
        return [get_suite(n) for n in dict.fromkeys(names)]
    suites = [get_suite(n) for n in STANDARD]
    if quick and device.type == "cpu":
        for s in suites:
            if s.numel > QUICK_CPU_MAX_PARAMS:
                print_progress(f"{s.name}: not run (--quick on CPU runs suites up to "
                               f"{QUICK_CPU_MAX_PARAMS / 1e6:.0f}M parameters; name it with --suite to run it)")
        suites = [s for s in suites if s.numel <= QUICK_CPU_MAX_PARAMS]
    return suites


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print(_list_suites())
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.plot and (why := report.plot_unavailable_reason()):
        parser.error(why)  # before the run, not after minutes of timing
    for flag in ("repeats", "warmup", "e2e_batch"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")

    try:
        suites = select_suites(args.suite, args.quick, device)
    except KeyError as e:
        parser.error(e.args[0])

    cuda = device.type == "cuda"
    if args.quick:
        warmup, repeats, budget = (3, 10, 2.0) if cuda else (1, 3, 1.0)
    else:
        warmup, repeats, budget = (10, 50, 10.0) if cuda else (3, 20, 5.0)
    e2e_batch = args.e2e_batch or (2 if args.quick and not cuda else 64)
    settings = Settings(
        device=device, dtype=args.dtype, quick=args.quick,
        warmup=args.warmup or warmup, repeats=args.repeats or repeats, budget_s=budget,
        e2e_batch=e2e_batch, methods=tuple(dict.fromkeys(args.methods or METHODS)),
        command=shlex.join(["python", "-m", "sn_cuda", "bench", *argv]),
    )

    result = run(suites, settings)
    print(report.markdown(result), end="")
    if args.json:
        report.write_json(result, args.json)
        print_progress(f"wrote {args.json}")
    if args.plot:
        report.plot(result, args.plot)
        print_progress(f"wrote {args.plot}")
    failed = report.failures(result)
    if failed:
        print_progress(f"{len(failed)} measurement(s) failed; see the notes under the table")
    return 1 if failed else 0
