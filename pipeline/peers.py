"""The peer processes of a tensor-parallel caption replica.

A replica with `caption.tensor_parallel: N` is one Ray Data actor holding N GPUs
(`caption.num_gpus: N`; 0 on CPU, ranks on gloo) and N processes: the actor itself is rank 0, and it starts ranks
1..N-1 as child processes (`python -m pipeline.peers`), each loading its shard of the target and
the whole draft and then following rank 0's streams (`Engine.follow`). Child processes rather than
Ray actors in a placement group: they inherit the actor's GPUs (rank r uses cuda:r of the actor's
CUDA_VISIBLE_DEVICES), need no scheduling of their own, and live and die with the replica, which
Ray Data already restarts and retries as one unit.

Failure is loud and quick, never a hang: a thread of the actor waits on every peer and ends the
actor the moment one exits (Ray restarts it; Ray Data retries its batches elsewhere), and each peer
ends itself when its parent is gone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time

EXIT_PEER_LOST = 75


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Peers:
    """Start ranks 1..`world`-1 with the replica's load settings, then join them as rank 0."""

    def __init__(self, world: int, load: dict):
        from lvspec import parallel

        port = _free_port()
        self.closing = False  # set by `close`: peers ending then is the end asked for, not a loss
        spec = json.dumps({**load, "model": dataclasses.asdict(load["model"]),
                           "generation": dataclasses.asdict(load["generation"]), "world": world, "port": port})
        self.procs = [subprocess.Popen([sys.executable, "-m", "pipeline.peers", str(rank), spec])
                      for rank in range(1, world)]
        for proc in self.procs:
            threading.Thread(target=self._watch, args=(proc,), name="lvspec-peer-watch", daemon=True).start()
        parallel.start(0, world, port)

    def _watch(self, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if not (self.closing and code == 0):
            self._lost(proc, code)

    def close(self, engine, timeout_s: float = 60.0) -> None:
        """End the replica on purpose: rank 0's `engine` lets the peers' `follow` return, and they exit."""
        self.closing = True
        engine.close()
        for proc in self.procs:
            proc.wait(timeout=timeout_s)

    def _lost(self, proc: subprocess.Popen, code: int) -> None:
        print(f"lvspec replica: tensor-parallel peer (pid {proc.pid}) exited with {code}; ending this replica "
              "so that Ray restarts it and retries its rows", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)

    def check(self, grace_s: float = 5.0) -> None:
        """After a failed stream: end this actor if a peer is gone (or goes within `grace_s`: a
        collective may fail on rank 0 a moment before the peer's exit is seen)."""
        deadline = time.monotonic() + grace_s
        while True:
            for proc in self.procs:
                if proc.poll() is not None:
                    self._lost(proc, proc.returncode)
            if time.monotonic() >= deadline:
                return
            time.sleep(0.1)


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(EXIT_PEER_LOST)


def main(rank: int, spec: dict) -> None:
    from lvspec import parallel
    from pipeline.config import GenerationConfig, ModelConfig
    from pipeline.replica import load_engine

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    world, port = spec.pop("world"), spec.pop("port")
    spec["generation"] = GenerationConfig(**spec["generation"])
    spec["model"] = ModelConfig(**spec["model"])
    parallel.start(rank, world, port)
    engine, _ = load_engine(**spec, rank=rank, world=world)
    engine.follow()


if __name__ == "__main__":
    main(int(sys.argv[1]), json.loads(sys.argv[2]))
