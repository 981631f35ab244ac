"""Rank 0's commands to the tensor-parallel workers: pickled, over one ZMQ PUSH socket per
worker, so sending never waits for a worker (the step's own work on rank 0 goes on while the
worker receives), plus a gloo group for what needs every rank at once (the ports at start, the
barrier at shutdown). Waiting for the next command never occupies a GPU stream.

The gloo broadcast it replaces (`broadcast_object_list`) held rank 0 until every worker had
received: 720 us a decode command of 1 sequence, 1,385 us of 128, on a 2-core CPU; ZMQ queues one
in 40 / 392 us there (scratch/channel_cost.py, twenty-second sitting).
"""

from __future__ import annotations

import pickle
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import zmq

HOST = "127.0.0.1"  # tensor parallelism runs on one machine


class Channel:
    def __init__(self, timeout: timedelta) -> None:
        """A collective: every rank builds its end together (after joining the process group).
        timeout: the longest a send (to a worker that stopped reading) or the barrier waits."""
        self.group = dist.new_group(backend="gloo")
        self.timeout = timeout
        self.ctx = zmq.Context()
        rank, world = dist.get_rank(), dist.get_world_size()
        self.sockets: list[zmq.Socket] = []
        ports: list[Any] = [None]
        if rank == 0:
            for _ in range(1, world):
                sock = self.ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 0)
                # A worker gone from the other end leaves PUSH with no peer: send would block.
                sock.setsockopt(zmq.SNDTIMEO, int(timeout.total_seconds() * 1000))
                self.sockets.append(sock)
            ports = [[s.bind_to_random_port(f"tcp://{HOST}") for s in self.sockets]]
        dist.broadcast_object_list(ports, src=0, group=self.group)
        if rank > 0:
            sock = self.ctx.socket(zmq.PULL)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{HOST}:{ports[0][rank - 1]}")
            self.sockets.append(sock)

    def send(self, command: object) -> None:
        """Rank 0: queue the command for every worker (a worker not yet connected gets it on
        connecting); zmq.Again where a worker has not taken it within the timeout."""
        data = pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL)
        for sock in self.sockets:
            sock.send(data, copy=False)

    def recv(self) -> Any:
        """A worker: the next command, waiting for it."""
        return pickle.loads(self.sockets[0].recv(copy=False).buffer)

    def barrier(self) -> None:
        """Every rank here (a rank that died or hangs raises on rank 0 within the timeout)."""
        dist.monitored_barrier(group=self.group, timeout=self.timeout)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.ctx.term()
