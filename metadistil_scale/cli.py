"""`metadistil-scale` command line: train (the main job), experiment (methods × seeds) and config inspection."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from metadistil_scale.config import ConfigError, load_config, save_config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --set, --output-dir and the DeepSpeed shorthands (also the Ray launcher's)."""
    parser.add_argument("--config", help="YAML recipe: a file, or the name of a shipped recipe such as glue_sst2 (default: the embedded text task)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set student_train.max_steps=50 (repeatable)")
    parser.add_argument("--output-dir", help="shorthand for --set output_dir=...")
    parser.add_argument("--deepspeed-teacher", metavar="JSON",
                        help="DeepSpeed config for the teacher (shorthand for --set deepspeed_teacher=...)")
    parser.add_argument("--deepspeed-student", metavar="JSON",
                        help="DeepSpeed config for the student (shorthand for --set deepspeed_student=...)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metadistil-scale", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune the teacher, distil the student with each method, test")
    add_config_arguments(train)
    _add_stop_arguments(train)
    experiment = sub.add_parser("experiment", help="run every method once per seed in `seeds`; write summary "
                                "tables (mean ± std, metadistil − kd paired 95%% interval) and dev-curve plots")
    add_config_arguments(experiment)
    experiment.add_argument("--resume", action="store_true", help="continue an unfinished run from its last checkpoint")
    lm = sub.add_parser("lm-train", help="causal-LM distillation: no-distillation, KD and MetaDistil students, "
                        "held-out perplexity (default: SmolLM2-135M and its every-other-layer student on the KJV)")
    add_config_arguments(lm)  # a recipe such as configs/lm_smollm2_kjv.yaml; default: the embedded run
    _add_stop_arguments(lm)
    lm_experiment = sub.add_parser("lm-experiment", help="causal-LM distillation, every method once per seed in "
                                   "`seeds`: summary tables (held-out perplexity, metadistil − kd paired) and plots")
    add_config_arguments(lm_experiment)
    lm_experiment.add_argument("--resume", action="store_true", help="continue each run from its last checkpoint")
    show = sub.add_parser("config", help="print the resolved, validated config")
    add_config_arguments(show)
    return parser


def _add_stop_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue a stopped run from its last checkpoints")
    parser.add_argument("--stop-after", type=int, metavar="STEPS",
                        help="checkpoint and stop once the running stage reaches STEPS steps (pre-emption)")


def config_from_args(args: argparse.Namespace):
    """The validated config that add_config_arguments' options describe."""
    return load_config(args.config, config_overrides(args))


def config_overrides(args: argparse.Namespace) -> list[str]:
    """--set overrides, then the shorthands' (last, so that they win)."""
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    for key in ("deepspeed_teacher", "deepspeed_student"):
        if getattr(args, key):
            overrides.append(f"{key}={getattr(args, key)}")
    return overrides


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    metric = results["metric"]
    table = Table(title=f"{results['task']} — test {metric} (best-on-dev checkpoint), seed {results['seed']}")
    for column in ("model", "method", "steps", f"dev {metric}", f"test {metric}", "teacher test after", "time (s)"):
        table.add_column(column)
    for row in results["rows"]:
        teacher_after = row.get("teacher_test", {}).get(metric)
        table.add_row(
            row["model"], row["method"], str(row.get("steps", "-")),
            f"{row['best_dev']:.4f}" if "best_dev" in row else "-",
            f"{row['test'][metric]:.4f}",
            f"{teacher_after:.4f}" if teacher_after is not None else "-",
            f"{row['wall_time_s']:.0f}" if "wall_time_s" in row else "-",
        )
    Console().print(table)
    print(f"total wall time: {results['wall_time_s']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from metadistil_scale.checkpoint import CheckpointError
    from metadistil_scale.data.text import DataError
    from metadistil_scale.models.text import ModelError

    try:
        if args.command == "lm-train":
            from metadistil_scale.lm.recipe import lm_train

            return _until_stopped(lambda: lm_train(args.config, config_overrides(args), resume=args.resume,
                                                   stop_after=args.stop_after))
        if args.command == "lm-experiment":
            return _lm_experiment(args)
        cfg = config_from_args(args)
        if args.command == "config":
            save_config(cfg, Path("/dev/stdout"))
            return 0
        from transformers.utils import logging as hf_logging

        from metadistil_scale.backends.dist import is_main

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        if args.command == "experiment":
            from metadistil_scale.experiment import run_experiment
            from metadistil_scale.report import format_table

            summary = run_experiment(cfg, resume=args.resume)
            if is_main():
                print(format_table(summary))
                print(f"summary: {Path(cfg.output_dir) / 'summary.md'}")
            return 0
        return _until_stopped(lambda: _train(cfg, args.resume, args.stop_after))
    except (ConfigError, DataError, ModelError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before a stage's loop, where there is nothing to checkpoint yet
        print("error: interrupted before training started; nothing was checkpointed", file=sys.stderr)
        return 130
    except Exception as err:
        output_dir = getattr(locals().get("cfg"), "output_dir", None)
        if not _disk_full(err, output_dir):
            raise
        # The writers (torch.save, safetensors, DeepSpeed) each wrap ENOSPC their own way; say the cause.
        print(f"error: no space left on device under {output_dir} ({type(err).__name__} while writing); "
              "free some space and rerun with --resume", file=sys.stderr)
        return 2


def _train(cfg, resume: bool, stop_after: int | None) -> int:
    from metadistil_scale.backends.dist import is_main
    from metadistil_scale.trainer import train

    results = train(cfg, resume=resume, stop_after=stop_after)
    if is_main():  # every rank of a data-parallel run ends here with the same results
        print_table(results)
        print(f"results: {Path(cfg.output_dir) / 'results.json'}")
    return 0


def _lm_experiment(args: argparse.Namespace) -> int:
    from metadistil_scale.backends.dist import is_main
    from metadistil_scale.lm.experiment import run_lm_experiment
    from metadistil_scale.lm.recipe import load_lm_config, quiet_transformers
    from metadistil_scale.report import format_table

    quiet_transformers()
    cfg = load_lm_config(args.config, config_overrides(args))
    summary = run_lm_experiment(cfg, resume=args.resume)
    if is_main():
        print(format_table(summary))
        print(f"summary: {Path(cfg.output_dir) / 'summary.md'}")
    return 0


def _until_stopped(run: Callable[[], int]) -> int:
    """A training command; a planned stop or a stop signal ends it, after its checkpoint, with its exit code."""
    from metadistil_scale.backends.dist import is_main
    from metadistil_scale.loop import StopRequested

    try:
        return run()
    except StopRequested as stop:
        if is_main():
            print(stop)
        return stop.exit_code


def _disk_full(err: BaseException, output_dir: str | None) -> bool:
    """Whether `err` (or what caused it) is a full disk: ENOSPC, or a writer's message for it, or no space left
    where the run writes."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen) or "os error 28" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return output_dir is not None and shutil.disk_usage(output_dir).free < 1 << 20
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
