"""The ``iem-ref`` command: ``check`` (the main job), ``equations`` (the map), ``warmup`` (compile CPU kernels ahead of time) and ``machine`` (what they run on)."""

from __future__ import annotations

import argparse
import sys


def _equations(args):
    from .equations import GROUPS, REGISTRY, derivation_path, tests_for

    tests = tests_for()
    if args.markdown:
        print(markdown_map())
        return 0
    print(f"{'ID':<4} {'function(s)':<58} {'derivation':<36} tests")
    last = None
    for eq_id, eq in REGISTRY.items():
        if eq.group != last:
            print(f"-- {eq.group}: {GROUPS[eq.group][0]}")
            last = eq.group
        mark = "" if derivation_path(eq_id).exists() else " (missing)"
        print(f"{eq_id:<4} {', '.join(eq.functions):<58} {eq.derivation + mark:<36} {len(tests[eq_id])}")
        if args.verbose:
            print(f"     {eq.statement}")
            for t in tests[eq_id]:
                print(f"       {t}")
    return 0


def markdown_map():
    """The README's equation map (ID -> statement -> functions -> derivation), generated from the registry."""
    from .equations import REGISTRY

    lines = ["| ID | equation | reference function(s) | derivation |", "|----|----------|-----------------------|------------|"]
    for eq_id, eq in REGISTRY.items():
        funcs = ", ".join(f"`{f.split('.')[-1]}`" for f in eq.functions)
        lines.append(f"| {eq_id} | `{eq.statement.replace('|', chr(92) + '|')}` | {funcs} | [{eq.derivation.split('/')[-1]}]({eq.derivation}) |")
    return "\n".join(lines)


def _check(args):
    from .checks import run_checks

    rows = run_checks()
    print(f"{'ID':<4} {'function':<40} {'checked against':<56} {'max error':>10} {'bound':>10}  result")
    failed = 0
    for eq_id, fn, against, err, tol, ok in rows:
        failed += not ok
        print(f"{eq_id:<4} {fn:<40} {against[:56]:<56} {err:>10.3g} {tol:>10.3g}  {'pass' if ok else 'FAIL'}")
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _warmup(args):
    from .accel.cpu import warmup

    variants = {"none": (False,), "only": (True,), "both": (False, True)}[args.variants]
    energies = ["dot", "sqeuclidean", "precomputed"] if args.all else args.energy
    if args.all:
        variants = (False, True)
    print(f"iem_ref.accel.cpu kernels ({', '.join(args.dtype)}; {', '.join(args.ops)}; energies {', '.join(energies)}; "
          f"variants: {'both' if len(variants) == 2 else ('only' if variants[0] else 'none')}), compiled or loaded from the cache:")
    warmup(dtypes=args.dtype, ops=args.ops, energies=energies, variants=variants, activations=args.all or args.activations)
    return 0


def _machine(args):
    from .accel.machine import describe

    info = describe()
    blas = info["blas"] or {}
    overrides = ", ".join(f"{k}={v}" for k, v in info["overrides"].items()) or "none"
    print(f"CPU:      {info['cpu'] or '?'} ({info['vector']}), {info['cores']} cores, {info['numba_threads']} Numba threads")
    print(f"BLAS:     {blas.get('library', '?')} {blas.get('version', '?')}, {blas.get('kernels', '?')} kernels ({blas.get('file', '?')})")
    print(f"OpenBLAS overrides in the environment: {overrides}")
    if info["advice"]:
        print(f"note:     {info['advice']}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="iem-ref", description="The implicit-EM reference: check every equation, list the map.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="evaluate every equation against an independent computation")
    p_check.set_defaults(func=_check)
    p_eq = sub.add_parser("equations", help="list equation ID -> function -> derivation -> tests")
    p_eq.add_argument("-v", "--verbose", action="store_true", help="also print each statement and test")
    p_eq.add_argument("--markdown", action="store_true", help="print the README's equation map table")
    p_eq.set_defaults(func=_equations)
    p_warm = sub.add_parser("warmup", help="compile and cache CPU kernels ahead of time (NUMBA_CACHE_DIR sets where)",
                            description="Compile the iem_ref.accel.cpu kernels a program will call, so that its first call loads them "
                                        "from Numba's cache. Default: the plain kernels (no bias, ALiBi, soft-cap, sinks or dropout) "
                                        "of the dot energy, forward and backward, float64 and float32.")
    p_warm.add_argument("--dtype", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    p_warm.add_argument("--ops", nargs="+", default=["forward", "backward"], choices=["forward", "backward", "verdict"],
                        help="verdict: the tiled oracle of iem_ref.testing (float64, dot products)")
    p_warm.add_argument("--energy", nargs="+", default=["dot"], choices=["dot", "sqeuclidean", "precomputed"],
                        help="precomputed: softmin_summary's kernel (forward only)")
    p_warm.add_argument("--variants", choices=["none", "only", "both"], default="none",
                        help="the kernels of calls with a bias, ALiBi, a soft-cap, sinks or dropout: none (default), only those, or both kinds")
    p_warm.add_argument("--activations", action="store_true", help="also the scalar activations (S3, S4, H3)")
    p_warm.add_argument("--all", action="store_true", help="every kernel: both kinds, every energy, and the activations")
    p_warm.set_defaults(func=_warmup)
    p_machine = sub.add_parser("machine", help="what the CPU kernels run on: the CPU, the BLAS behind their tiles and its kernel set")
    p_machine.set_defaults(func=_machine)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
