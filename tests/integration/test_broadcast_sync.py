"""The collective weight-sync protocol, over gloo in two processes (the GPU path runs it over NCCL)."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from align.models import TinyModelConfig, build_char_tokenizer, build_tiny_causal_lm
from ray_jobs.weight_sync import BroadcastGroup, tensor_specs

CONFIG = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=5)


def _party(rank: int, port: int, directory: str, out: dict) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    # each party already has a default group of its own (as a DeepSpeed rank does): the sync group is independent
    dist.init_process_group("gloo", init_method=f"file://{directory}/default-{rank}", rank=0, world_size=1)
    group = BroadcastGroup(host="127.0.0.1", port=port, rank=rank, world_size=2)
    try:
        if rank == 0:  # the learner: a step changed its weights
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            group.send(state, version=7)
            out["sent"] = {k: v.clone() for k, v in state.items()}
        else:  # the rollout worker: receives into fresh buffers and loads them
            specs = tensor_specs(model.state_dict())
            version, state = group.receive(specs)
            model.load_state_dict(state)
            out["version"] = version
            out["received"] = {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        dist.destroy_process_group()


def test_broadcast_delivers_every_tensor_and_the_version(tmp_path: Path) -> None:
    tokenizer = build_char_tokenizer()
    build_tiny_causal_lm(len(tokenizer), CONFIG).save_pretrained(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_party, args=(port, str(tmp_path), out), nprocs=2, join=True)
    assert out["version"] == 7
    for name, tensor in out["sent"].items():
        torch.testing.assert_close(out["received"][name], tensor, rtol=0, atol=0)
