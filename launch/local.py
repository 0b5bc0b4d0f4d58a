"""Run N copies of one command as a jax.distributed cluster on 127.0.0.1 (CPU, gloo collectives).

    python launch/local.py -n 2 -- python -m doa_jax.train --gin_file=gin_configs/runs/finetune_tiny.gin ...

Each process gets DOA_COORDINATOR_ADDRESS / DOA_NUM_PROCESSES / DOA_PROCESS_ID (read by
`doa_jax.distributed.initialize`) and, with --pass_flags, the equivalent
--coordinator_address/--num_processes/--process_id flags. Output lines are prefixed with [i]. If
one process fails, the others are killed and the launcher exits with that process's code.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _pump(i: int, stream, out) -> None:
    for line in iter(stream.readline, b''):
        out.write(f'[{i}] {line.decode(errors="replace")}')
        out.flush()


def launch(command: Sequence[str], num_processes: int, pass_flags: bool = False,
           devices_per_process: int = 1, timeout: float | None = None) -> int:
    """Runs the cluster; returns 0 if all processes succeed, else the first failing exit code."""
    if not command:
        raise SystemExit('launch/local.py: no command given; put it after "--", e.g. '
                         '-- python -m doa_jax.train --gin_file=...')
    address = f'127.0.0.1:{free_port()}'
    procs = []
    for i in range(num_processes):
        env = {**os.environ, 'DOA_COORDINATOR_ADDRESS': address, 'DOA_NUM_PROCESSES': str(num_processes),
               'DOA_PROCESS_ID': str(i), 'JAX_PLATFORMS': 'cpu', 'CUDA_VISIBLE_DEVICES': '',
               'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo',
               'XLA_FLAGS': (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={devices_per_process}').strip()}
        flags = [f'--coordinator_address={address}', f'--num_processes={num_processes}',
                 f'--process_id={i}'] if pass_flags else []
        p = subprocess.Popen([*command, *flags], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=_pump, args=(i, p.stdout, sys.stdout), daemon=True).start()
        procs.append(p)
    deadline = None if timeout is None else time.monotonic() + timeout
    code = 0
    while procs and code == 0:
        for p in list(procs):
            rc = p.poll()
            if rc is not None:
                procs.remove(p)
                if rc != 0:
                    code = rc if rc > 0 else 128 - rc
                    print(f'launch/local.py: process {p.args!r} exited with {rc}; stopping the others.',
                          file=sys.stderr)
        if deadline is not None and time.monotonic() > deadline and procs:
            print(f'launch/local.py: timeout after {timeout}s; stopping.', file=sys.stderr)
            code = 124
        time.sleep(0.1)
    for p in procs:  # only our own children, by their process group
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index('--') + 1:] if '--' in argv else []
    own = argv[:argv.index('--')] if '--' in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('-n', '--num_processes', type=int, default=2)
    parser.add_argument('--devices_per_process', type=int, default=1)
    parser.add_argument('--pass_flags', action='store_true',
                        help='also append --coordinator_address/--num_processes/--process_id')
    parser.add_argument('--timeout', type=float, default=None)
    args = parser.parse_args(own)
    return launch(command, args.num_processes, args.pass_flags, args.devices_per_process, args.timeout)


if __name__ == '__main__':
    sys.exit(main())
