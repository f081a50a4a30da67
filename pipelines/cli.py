"""`embforge`: generate training data, train a student, evaluate it, average checkpoints, publish, or run it all.

Configuration comes from one file (TOML or YAML) with a section per command (`[generate]`, `[train]`, `[evaluate]`),
then `--set section.key=value` overrides, then the command's own flags. Everything is checked before any
work starts; a problem is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace

from pipelines.config_loading import ConfigError

LOGGER = logging.getLogger("embforge")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML or YAML file; defaults to the offline configuration")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override one setting, e.g. --set generate.mining.k=16 (repeatable)")


def _generate_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", help="run directory (local or gs://); overrides generate.output")
    parser.add_argument("--corpus",
                        help="corpus path or glob, or builtin:python-stdlib; overrides generate.corpus.path")
    parser.add_argument("--llm", choices=("local", "gemini"), help="LLM backend; overrides generate.llm.backend")
    parser.add_argument("--teacher", choices=("local", "gemini"),
                        help="teacher embedding backend; overrides generate.teacher.backend")
    parser.add_argument("--sample", type=int, help="use at most this many passages; overrides generate.corpus.sample")
    parser.add_argument("--max-llm-calls", type=int,
                        help="at most this many new LLM calls in the whole run (cache hits are free); "
                             "overrides generate.budget.max_llm_calls")
    parser.add_argument("--max-cost", type=float, metavar="USD",
                        help="stop new LLM calls before their estimated cost (list prices, worst case per call) "
                             "would pass this many US dollars; overrides generate.budget.max_cost_usd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embforge",
        description="Synthetic training data for small text-embedding models, and a trainer and evaluator for them.",
        epilog="Unrecognised --options of generate and run are passed to Apache Beam "
               "(e.g. --runner DataflowRunner --project P --region R --temp_location gs://...).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="corpus -> queries, graded pairs, mined negatives, Parquet shards")
    _add_config_arguments(generate)
    _generate_flags(generate)

    train = commands.add_parser("train", help="train a student from a run's shards")
    _add_config_arguments(train)
    train.add_argument("--data", help="run directory written by generate (default: generate.output)")
    train.add_argument("--output", help="model directory; overrides train.output_dir")
    train.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                       help="resume from the latest checkpoint in the output directory, or from CHECKPOINT")

    evaluate = commands.add_parser("evaluate", help="retrieval and classification metrics, base vs trained")
    _add_config_arguments(evaluate)
    evaluate.add_argument("--model", action="append", metavar="NAME=PATH",
                          help="a model to evaluate (repeatable); overrides evaluate.models")
    evaluate.add_argument("--output", help="report directory; overrides evaluate.output")

    soup = commands.add_parser("soup", help="average checkpoints or trained models into one model")
    soup.add_argument("models", nargs="+", help="model or checkpoint directories")
    soup.add_argument("--output", required=True, help="directory for the averaged model")
    soup.add_argument("--weights", type=float, nargs="+", help="one weight per model (default: uniform)")

    publish = commands.add_parser("publish", help="upload a run's dataset or a trained model to the Hugging Face Hub")
    publish.add_argument("kind", choices=("dataset", "model"))
    publish.add_argument("path", help="run directory (dataset) or model directory (model)")
    publish.add_argument("--repo-id", required=True, metavar="ORG/NAME")
    publish.add_argument("--private", action="store_true",
                         help="create the repo private, or make an existing public one private before uploading")
    publish.add_argument("--revision", help="branch to upload to (default: main)")
    publish.add_argument("--include-rejected", action="store_true", help="also upload rejected rows (dataset)")
    publish.add_argument("--license", default="other",
                         help="license id for the card, e.g. cc-by-4.0 (default: other; say which in the card)")
    publish.add_argument("--report", help="report.json or its folder for the model card (default: found beside it)")

    run = commands.add_parser("run", help="generate -> train -> evaluate with one configuration")
    _add_config_arguments(run)
    _generate_flags(run)
    return parser


def _generate_overrides(args: argparse.Namespace) -> list[str]:
    flags = {
        "generate.output": args.output,
        "generate.corpus.path": args.corpus,
        "generate.llm.backend": args.llm,
        "generate.teacher.backend": args.teacher,
        "generate.corpus.sample": args.sample,
        "generate.budget.max_llm_calls": args.max_llm_calls,
        "generate.budget.max_cost_usd": args.max_cost,
    }
    return [f"{key}={value}" for key, value in flags.items() if value is not None]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, beam_args = parser.parse_known_args(argv)
    if beam_args and args.command not in ("generate", "run"):
        parser.error(f"unrecognized arguments: {' '.join(beam_args)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.run import GenerationFailed

    try:
        return _dispatch(args, beam_args)
    except ConfigError as error:
        print(f"embforge: error: {error}", file=sys.stderr)
        return 2
    except GenerationFailed as error:
        print(f"embforge: failed: {error}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace, beam_args: list[str]) -> int:
    from pipelines.config import load_run_config

    if args.command == "soup":
        from embedder.soup import soup

        try:
            print(soup(args.models, args.weights, args.output))
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(str(error)) from error
        return 0
    if args.command == "publish":
        from pipelines.publish import publish

        print(publish(args.kind, args.path, repo_id=args.repo_id, private=args.private, revision=args.revision,
                      include_rejected=args.include_rejected, license=args.license, report=args.report))
        return 0

    overrides = list(args.overrides)
    if args.command in ("generate", "run"):
        overrides += _generate_overrides(args)
    if args.command == "train" and args.output:
        overrides.append(f"train.output_dir={args.output}")
    if args.command == "evaluate" and args.output:
        overrides.append(f"evaluate.output={args.output}")
    config = load_run_config(args.config, overrides, beam_args)
    if args.command == "evaluate" and args.model:
        models = {}
        for spec in args.model:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--model {spec!r}: expected NAME=PATH")
            models[name] = path
        config = replace(config, evaluate=replace(config.evaluate, models=models))

    if args.command == "generate":
        from pipelines.run import generate

        generate(config.generate)
    elif args.command == "train":
        from embedder.train import train

        train_config = config.train_config()
        try:
            print(train(train_config, args.data or config.generate.output, resume=args.resume))
        except FileExistsError as error:
            raise ConfigError(f"{train_config.output_dir} already has checkpoints: add --resume to continue that run, "
                              "or give another --output") from error
    elif args.command == "evaluate":
        from pipelines.run import evaluate

        evaluate(config.evaluate)
    elif args.command == "run":
        from pipelines.run import run_all

        run_all(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
