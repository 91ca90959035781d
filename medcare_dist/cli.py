"""Command line of the training job: `deepspeed launch/train.py --recipe R.yaml [key=value ...]`."""

import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="launch/train.py",
        description="MedCare two-stage fine-tuning: stage 1 (attention LoRA + knowledge/noise mixture-of-LoRA) "
                    "-> TAIA merge -> stage 2 (orthogonal alignment LoRA) -> merged model.")
    p.add_argument("--recipe", required=True, help="YAML recipe, e.g. launch/recipes/demo.yaml, or the name of a shipped "
                   "one (demo, small-chat, qwen1.5-1.8b, qwen1.5-7b, qwen1.5-14b, ablation)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. stage1.lr=1e-4 stage=2")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from medcare_dist.training.preemption import install, watch_launcher

    install()  # a preemption signal during start-up must not kill a rank (SIGUSR1's default action)
    watch_launcher()  # a `deepspeed` command killed by the user stops the ranks too
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    import warnings

    # torch.distributed deprecation notices from inside DeepSpeed, once per collective.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from medcare_dist.config import load_config
    from medcare_dist.errors import STORAGE_ERRNOS, InputError, storage_message
    from medcare_dist.pipeline import Pipeline
    from medcare_dist.training.trainer import NonFiniteStepsError

    pipeline = None
    try:
        cfg = load_config(args.recipe, args.overrides)
        pipeline = Pipeline(cfg)
        pipeline.run()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteStepsError as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(3)
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        print(f"error: {storage_message(e.filename, e.errno)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if pipeline is not None and pipeline.lock is not None:
            pipeline.lock.release()


if __name__ == "__main__":
    main()
