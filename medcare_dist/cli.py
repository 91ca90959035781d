"""Command line of the training job: `deepspeed launch/train.py --recipe R.yaml [key=value ...]`."""

import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        description="MedCare two-stage fine-tuning: stage 1 (attention LoRA + knowledge/noise mixture-of-LoRA) "
                    "-> TAIA merge -> stage 2 (orthogonal alignment LoRA) -> merged model.")
    p.add_argument("--recipe", required=True, help="YAML recipe, e.g. launch/recipes/demo.yaml")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. stage1.lr=1e-4 stage=2")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from .preemption import install

    install()  # a preemption signal during start-up must not kill a rank (SIGUSR1's default action)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    import warnings

    # torch.distributed deprecation notices from inside DeepSpeed, once per collective.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from .config import ConfigError, load_config
    from .data import DataError
    from .adapter_io import AdapterCheckpointError
    from .checkpoint import CheckpointError
    from .pipeline import PipelineError, run
    from .trainer import NonFiniteStepsError

    try:
        cfg = load_config(args.recipe, args.overrides)
        run(cfg)
    except (ConfigError, DataError, AdapterCheckpointError, CheckpointError, PipelineError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteStepsError as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
