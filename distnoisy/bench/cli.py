"""Benchmarks, printing ratios measured side by side in one run.

The command line: ``python -m distnoisy.bench gpu|steps|loader|two-networks|plain-loop|store|
midepoch|influence|pipeline|pipeline-report ...``; each benchmark module adds its sub-command
(``add_parser``) and runs it (``main(args, argv)``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from distnoisy.bench import gpu


def _parser(cpu_benches: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m distnoisy.bench", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="bench", required=True)
    gpu.add_parser(sub)
    if not cpu_benches:
        return p
    # Imported here: they need the whole stack (OmegaConf), which ``gpu`` must run without.
    from distnoisy.bench import (
        influence,
        loader,
        midepoch,
        pipeline,
        pipeline_report,
        plain_loop,
        steps,
        two_networks,
    )
    from distnoisy.bench import store as store_bench

    steps.add_parser(sub)
    loader.add_parser(sub)
    two_networks.add_parser(sub)
    plain_loop.add_parser(sub)
    store_bench.add_parser(sub)
    midepoch.add_parser(sub)
    influence.add_parser(sub)
    pipeline.add_parser(sub)
    pipeline_report.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> Any:
    """Run ``python -m distnoisy.bench gpu|steps|loader|two-networks|plain-loop|store ...``;
    print the results, optionally write ``--out``.

    Returns
    -------
    StepBenchReport, LoaderReport, TwoNetworkReport, PlainLoopReport or StoreBenchReport
        The measured report (for tests and callers).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    only_gpu = bool(argv) and argv[0] == "gpu"
    args = _parser(cpu_benches=not only_gpu).parse_args(argv)
    if args.bench == "gpu":
        return gpu.main(args, argv)
    from distnoisy.bench import influence, loader, pipeline, plain_loop, steps, two_networks
    from distnoisy.bench import store as store_bench
    from distnoisy.bench.common import _without_note
    from distnoisy.core.errors import DistnoisyError

    if args.bench == "loader":
        return loader.main(args, _without_note(argv))
    if args.bench == "plain-loop":
        return plain_loop.main(args, argv)
    if args.bench == "two-networks":
        return two_networks.main(args, argv)
    if args.bench == "store":
        return store_bench.main(args, argv)
    if args.bench == "midepoch":
        from distnoisy.bench import midepoch

        return midepoch.main(args, argv)
    if args.bench == "influence":
        return influence.main(args, argv)
    if args.bench == "pipeline-report":
        from distnoisy.bench import pipeline_report

        return pipeline_report.main(args, argv)
    if args.bench == "pipeline":
        try:
            return pipeline.main(args, argv)
        except DistnoisyError as e:
            print(f"distnoisy: error: {e}", file=sys.stderr)
            sys.exit(2)
    return steps.main(args, argv)
