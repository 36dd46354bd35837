"""A converted model trains under DistributedDataParallel (2 CPU processes, gloo on
loopback) with the gradients of the unfused model, drop path included."""

import datetime
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from conversion_checks import assert_gradients_match, gradients, randomize_vectors, tiny_metaformer
from fused_poolformer.convert import convert_model

WORLD_SIZE = 2
STEPS = 2
SHARD = 2  # samples per rank
TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard_seed(step: int, rank: int) -> int:
    """Seed of the drop-path masks a rank draws at a step (the reference replays it)."""
    return 1000 * step + rank


def train_and_compare(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S // 2))
    try:
        torch.manual_seed(0)
        reference = tiny_metaformer(drop_path_rate=0.3).train()
        randomize_vectors(reference)
        fused = DistributedDataParallel(convert_model(reference, backend="cpu"))
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
        fused_opt = torch.optim.SGD(fused.parameters(), lr=0.05, momentum=0.9)
        data = torch.Generator().manual_seed(7)
        for step in range(STEPS):
            x = torch.randn(WORLD_SIZE * SHARD, 3, 32, 32, generator=data)
            target = torch.randint(0, 10, (WORLD_SIZE * SHARD,), generator=data)
            shards = list(zip(x.split(SHARD), target.split(SHARD)))

            torch.manual_seed(shard_seed(step, rank))
            F.cross_entropy(fused(shards[rank][0]), shards[rank][1]).backward()  # DDP averages over ranks
            for r, (xs, ts) in enumerate(shards):  # the same average, computed unfused in one process
                torch.manual_seed(shard_seed(step, r))
                (F.cross_entropy(reference(xs), ts) / WORLD_SIZE).backward()

            assert_gradients_match(gradients(reference), fused.module)
            for opt in (ref_opt, fused_opt):
                opt.step()
                opt.zero_grad(set_to_none=True)
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_match_unfused():
    context = mp.start_processes(train_and_compare, args=(free_port(),), nprocs=WORLD_SIZE, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"DDP workers still running after {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
