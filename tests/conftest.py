import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

import helpers  # noqa: E402


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """Demo data, tokenizer and a briefly pretrained 2-layer base, built once for the session."""
    import torch

    from medcare_dist.config import TinyModelConfig
    from medcare_dist.demo.assets import prepare_demo
    from medcare_dist.demo.base_model import build_demo_base

    root = tmp_path_factory.mktemp("tiny_assets")
    demo = prepare_demo(root / "demo")
    tiny = TinyModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend with the rest of the machine
    try:
        build_demo_base(root / "base", demo.tokenizer(), tiny, seed=0, steps=30)
    finally:
        torch.set_num_threads(threads)
    return {"base": root / "base", "stage1": demo.files["stage1_train"], "stage2": demo.files["stage2_train"]}


@pytest.fixture(scope="module")
def world():
    """A gloo process group of one rank for in-process engines; torn down so later tests can make their own."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    import deepspeed.comm

    from medcare_dist.training.distributed import init_distributed

    import torch.nn.functional as F

    with pytest.MonkeyPatch.context() as mp:
        for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(helpers.free_port()), RANK="0",
                               WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1").items():
            mp.setenv(key, value)
        # A ZeRO-3 engine built on a model not made under zero.Init replaces F.linear by DeepSpeed's wrapper
        # (which keeps every input) and leaves it so: put it back for the tests that follow.
        mp.setattr(F, "linear", F.linear)
        init_distributed(timeout_s=120)
        try:
            yield
        finally:
            deepspeed.comm.destroy_process_group()
