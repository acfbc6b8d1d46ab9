"""Multi-host start-up: the command-line flags and the `jax.distributed.initialize` call.

On TPU pods and Slurm, `--distributed` lets JAX detect the coordinator; elsewhere the
coordinator, process count and process index are given explicitly. Call `initialize`
before anything touches a JAX device.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the multi-host flags (`--distributed`, `--coordinator`, ...) to a parser."""
    g = parser.add_argument_group("multi-host (auto-detected on TPU pods and Slurm)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (auto-detects TPU/Slurm)")
    g.add_argument("--coordinator", help="coordinator address host:port (explicit start)")
    g.add_argument("--num-processes", type=int, help="number of processes (explicit start)")
    g.add_argument("--process-id", type=int, help="this process' index (explicit start)")


def initialize(args: argparse.Namespace) -> None:
    """Starts multi-host JAX when the flags ask for it; does nothing otherwise."""
    if not (args.coordinator or args.num_processes or args.distributed):
        return
    import jax  # Here, not at the top: single-host commands never pay for it.

    if args.coordinator or args.num_processes:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes,
                                   process_id=args.process_id)
    else:
        jax.distributed.initialize()
    log.info("process %d of %d", jax.process_index(), jax.process_count())
