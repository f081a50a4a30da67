"""`embforge`: generate training data, train a student, evaluate it, average checkpoints, quantize, publish, or run it
all.

Configuration comes from one file (TOML or YAML) with a section per command (`[generate]`, `[train]`, `[evaluate]`),
then `--set section.key=value` overrides, then the command's own flags. Everything is checked before any work starts.

What a user sees:
- the console shows embforge's own progress and summary; every library's log lines go to `<run>/embforge.log`
  (pipelines/logs.py), and to the console too with `-v`;
- an option that is neither embforge's nor Apache Beam's stops the command, naming it and the closest known option;
- any failure is one line on stderr, without a traceback unless `-v`. Exit status 2: the user must change the command,
  its config, its data or its environment (a bad value, a missing file or model package, a rejected API key);
  1: the run itself failed (a service stayed unavailable, rows went missing, a bug).
"""

from __future__ import annotations

import argparse
import difflib
import logging
import posixpath
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace

from pipelines import logs
from pipelines.config_loading import ConfigError

LOGGER = logging.getLogger("embforge")

#: Commands whose unrecognised options may be Apache Beam pipeline options (`--runner DataflowRunner ...`).
BEAM_COMMANDS = ("generate", "run")
#: Errors a user fixes by changing the command, config, data or environment (exit 2), by class name, so that the
#: text of an error raised in a Beam worker process (which comes back as a RuntimeError holding the traceback) is
#: classified the same way as the error itself.
USER_ERROR_NAMES = frozenset({"ConfigError", "PublishError", "SchemaError", "EvalDataError", "ModelUnavailableError",
                              "GeminiAuthError", "UsageError"})
#: The last line of a Python traceback names the error: `package.module.SomeError: message`.
_ERROR_LINE = re.compile(r"^(?:\w+\.)*(?P<name>\w*(?:Error|Exception|Exit))(?::\s*(?P<message>.*))?$")


class UsageError(ConfigError):
    """A command line that cannot be right: an unknown option, a stray argument."""


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML or YAML file; defaults to the offline configuration")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override one setting, e.g. --set generate.mining.k=16 (repeatable)")


def _generate_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", help="run directory (local or gs://); overrides generate.output")
    parser.add_argument("--corpus",
                        help="corpus path or glob, or builtin:python-stdlib; overrides generate.corpus.path")
    parser.add_argument("--llm", choices=("local", "gemini", "openai"),
                        help="LLM backend (openai: any OpenAI-compatible server, see generate.llm.base_url); "
                             "overrides generate.llm.backend")
    parser.add_argument("--teacher", choices=("local", "gemini"),
                        help="teacher embedding backend; overrides generate.teacher.backend")
    parser.add_argument("--sample", type=int, help="use at most this many passages; overrides generate.corpus.sample")
    parser.add_argument("--max-llm-calls", type=int,
                        help="at most this many new LLM calls in the whole run (cache hits are free); "
                             "overrides generate.budget.max_llm_calls")
    parser.add_argument("--max-cost", type=float, metavar="USD",
                        help="stop new LLM and embedding calls before their estimated cost (list prices, worst case "
                             "per call) would pass this many US dollars; overrides generate.budget.max_cost_usd")
    parser.add_argument("--dry-run", nargs="?", const="table", choices=("table", "json"), default=None,
                        help="print what generation would ask of its models (new requests per stage, tokens, cost "
                             "online and in batch mode, time) from the corpus and the caches, then stop: no model is "
                             "called and nothing is written; 'json' prints it as JSON")


def _resume_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue the interrupted training run (or from CHECKPOINT) instead of training afresh")


def build_parser() -> argparse.ArgumentParser:
    # -v is accepted before and after the command; SUPPRESS keeps a command's own default from overwriting the
    # value given before it.
    # No abbreviations (argparse's default takes --resum for --resume): an option is spelt out or it is unknown, and
    # Beam's options never shadow a prefix of ours.
    verbosity = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    verbosity.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                           help="every library's log lines on the console, at debug level, and tracebacks")
    parser = argparse.ArgumentParser(
        prog="embforge",
        allow_abbrev=False,
        description="Synthetic training data for small text-embedding models, and a trainer and evaluator for them.",
        epilog="generate and run also take Apache Beam pipeline options "
               "(e.g. --runner DataflowRunner --project P --region R --temp_location gs://...).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", default=False,
                        help="every library's log lines on the console, at debug level, and tracebacks")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[verbosity], allow_abbrev=False, help=summary)

    generate = command("generate", "corpus -> queries, graded pairs, mined negatives, Parquet shards")
    _add_config_arguments(generate)
    _generate_flags(generate)

    train = command("train", "train a student from a run's shards")
    _add_config_arguments(train)
    train.add_argument("--data", help="run directory written by generate, on any filesystem Beam knows "
                                      "(default: generate.output)")
    train.add_argument("--output", help="model directory; overrides train.output_dir (default: <run>/student)")
    _resume_flag(train)

    evaluate = command("evaluate", "retrieval and classification metrics, models side by side")
    _add_config_arguments(evaluate)
    evaluate.add_argument("--model", action="append", metavar="NAME=MODEL",
                          help="a model to evaluate: a path, a Hub id or packaged:<name> (repeatable; the first is "
                               "the baseline); overrides evaluate.models")
    evaluate.add_argument("--retrieval", action="append", metavar="[NAME=]BEIR_DIR",
                          help="a BEIR folder: corpus.jsonl, queries.jsonl, qrels/test.tsv (repeatable); "
                               "overrides evaluate.retrieval")
    evaluate.add_argument("--classification", action="append", metavar="[NAME=]TRAIN,TEST",
                          help="labelled train and test files: CSV, TSV or JSON Lines, gzipped or not (repeatable); "
                               "overrides evaluate.classification")
    evaluate.add_argument("--text-field", help="column holding the text in classification files (default: text)")
    evaluate.add_argument("--label-field", help="column holding the label in classification files (default: label)")
    evaluate.add_argument("--output", help="report directory; overrides evaluate.output")
    evaluate.add_argument("--binary", action="store_true", default=None,
                          help="also evaluate binary output embeddings (sign bits, Hamming search, and with float "
                               "rescoring of the top candidates); overrides evaluate.binary")

    soup = command("soup", "average checkpoints or trained models into one model")
    soup.add_argument("models", nargs="+", help="model or checkpoint directories")
    soup.add_argument("--output", required=True, help="directory for the averaged model")
    soup.add_argument("--weights", type=float, nargs="+", help="one weight per model (default: uniform)")

    quantize = command("quantize", "store a trained student's weights in int8, int4 or mixed precision")
    quantize.add_argument("model", help="the float student's folder (what `embforge train` writes)")
    # Checked by quantize_model, so that a wrong value is the one-line error every other bad input gets.
    quantize.add_argument("--precision", required=True,
                          help="int8 (int8 matrix products on the CPU), int4 (packed, dequantized at load) or mixed "
                               "(int8 attention, int4 feed-forward)")
    quantize.add_argument("--output", required=True, help="folder for the quantized model (replaced once complete)")

    publish = command("publish", "upload a run's dataset or a trained model to the Hugging Face Hub")
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

    run = command("run", "generate -> train -> evaluate with one configuration, all under --output")
    _add_config_arguments(run)
    _generate_flags(run)
    _resume_flag(run)
    return parser


# --- options that are neither embforge's nor Beam's ------------------------------------------------------------------


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings]  # noqa: SLF001


def _beam_parser() -> argparse.ArgumentParser:
    """Every pipeline option Apache Beam knows, parsed as Beam parses them."""
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    # Beam's own argument parser: some of its options are declared through its additions to argparse. Each options
    # class once, as PipelineOptions.get_all_options collects them.
    parser = _BeamArgumentParser(allow_abbrev=False)
    for options_class in {str(cls): cls for cls in PipelineOptions.__subclasses__()}.values():
        options_class._add_argparse_args(parser)  # noqa: SLF001 - Beam's documented extension point
    return parser


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return action.choices[command]
    raise AssertionError("the parser has no commands")  # pragma: no cover


def unknown_option_error(command: str, token: str, known: Sequence[str]) -> UsageError:
    """One line naming the unknown option and the closest known one, if any is close."""
    name = token.split("=", 1)[0]
    if not name.startswith("-"):
        return UsageError(f"embforge {command}: unexpected argument {token!r}")
    # Compare without leading dashes and with "_" and "-" alike: --max_cost is --max-cost misspelt.
    def canonical(option: str) -> str:
        return option.lstrip("-").replace("_", "-")

    by_canonical = {canonical(option): option for option in known if option.startswith("--")}
    close = difflib.get_close_matches(canonical(name), list(by_canonical), n=1, cutoff=0.7)
    hint = f" (did you mean {by_canonical[close[0]]}?)" if close else ""
    return UsageError(f"embforge {command}: unknown option {name}{hint}")


def parse_arguments(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """(embforge's arguments, Beam pipeline options); UsageError for anything that is neither."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args, []
    known = _option_strings(_command_parser(parser, args.command))
    unknown = extra
    if args.command in BEAM_COMMANDS:
        beam_parser = _beam_parser()
        _, unknown = beam_parser.parse_known_args(extra)
        known += _option_strings(beam_parser)
    if unknown:
        raise unknown_option_error(args.command, unknown[0], known)
    return args, extra


# --- errors ---------------------------------------------------------------------------------------------------------


def describe_error(error: BaseException) -> tuple[str, bool]:
    """(one line saying what went wrong, whether the user must change something). An error raised in a Beam worker
    process arrives as a RuntimeError holding the worker's traceback; its last line names the real error."""
    text = str(error).strip()
    name = type(error).__name__
    if "Traceback (most recent call last)" in text:
        for line in reversed(text.splitlines()):
            match = _ERROR_LINE.match(line.strip())
            if match:
                name, text = match.group("name"), match.group("message") or match.group("name")
                break
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    message = lines[0] if lines else name
    user_error = name in USER_ERROR_NAMES or any(cls.__name__ in USER_ERROR_NAMES for cls in type(error).__mro__)
    # A path that is not there, or not what it should be: the user named it.
    user_error = user_error or isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError))
    ours = type(error).__module__.split(".", 1)[0] in logs.OWN_PACKAGES and name == type(error).__name__
    if not user_error and not ours and name not in message:
        # A library's error: its type often says more than its message ("KeyError: 'x'").
        message = f"{name}: {message}"
    return message, user_error


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, beam_options = parse_arguments(argv)
    except UsageError as error:
        print(f"embforge: error: {error}", file=sys.stderr)
        return 2
    verbose = bool(getattr(args, "verbose", False))
    logs.configure(verbose)
    try:
        _dispatch(args, beam_options)
        return 0
    except KeyboardInterrupt:
        print("embforge: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every failure becomes one line; -v shows the traceback
        message, user_error = describe_error(error)
        if verbose:
            traceback.print_exception(error, file=sys.stderr)
        else:
            LOGGER.debug("traceback", exc_info=error)
        if user_error:
            print(f"embforge: error: {message}", file=sys.stderr)
            return 2
        hint = "" if verbose else " (-v shows the traceback)"
        print(f"embforge: failed: {message}{hint}", file=sys.stderr)
        return 1


# --- the commands ---------------------------------------------------------------------------------------------------


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
    overrides = [f"{key}={value}" for key, value in flags.items() if value is not None]
    if args.command == "run" and args.output:
        # `run --output DIR` puts everything under DIR, whatever the config file says about the student and report.
        overrides += [f"train.output_dir={posixpath.join(args.output, 'student')}",
                      f"evaluate.output={posixpath.join(args.output, 'report')}"]
    return overrides


def _evaluate_overrides(config, args: argparse.Namespace):
    evaluate = config.evaluate
    if args.model:
        models = {}
        for spec in args.model:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise UsageError(f"--model {spec!r}: expected NAME=MODEL")
            models[name] = path
        evaluate = replace(evaluate, models=models)
    if args.retrieval:
        evaluate = replace(evaluate, retrieval=tuple(args.retrieval))
    if args.classification:
        evaluate = replace(evaluate, classification=tuple(args.classification))
    if args.text_field:
        evaluate = replace(evaluate, text_field=args.text_field)
    if args.label_field:
        evaluate = replace(evaluate, label_field=args.label_field)
    if args.binary:
        evaluate = replace(evaluate, binary=True)
    return replace(config, evaluate=evaluate)


def _log_to(folder: str, key: str) -> None:
    """Keep the log file in `folder` (a run directory) when it is local; a remote run logs to the console only."""
    if "://" in folder:
        logs.attach_file(None)
        return
    path = posixpath.join(folder, logs.LOG_NAME)
    try:
        logs.attach_file(path)
    except OSError as error:
        raise ConfigError(f"{key}: cannot write the log file {path} ({error.strerror or error})") from error


def _print_model_folder(write: Callable[[], str]) -> None:
    """Runs a command that writes a model folder (soup, quantize) and prints the folder; a bad argument is one line."""
    logs.attach_file(None)
    try:
        print(write())
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from error


def _dispatch(args: argparse.Namespace, beam_options: list[str]) -> None:
    if args.command == "soup":
        from embedder.soup import soup

        _print_model_folder(lambda: soup(args.models, args.weights, args.output))
        return
    if args.command == "quantize":
        from embedder.quantized_model import quantize_model

        _print_model_folder(lambda: quantize_model(args.model, args.precision, args.output))
        return
    if args.command == "publish":
        from pipelines.publish import publish

        logs.attach_file(None)
        print(publish(args.kind, args.path, repo_id=args.repo_id, private=args.private, revision=args.revision,
                      include_rejected=args.include_rejected, license=args.license, report=args.report))
        return

    from pipelines.config import load_run_config

    overrides = list(args.overrides)
    if args.command in BEAM_COMMANDS:
        overrides += _generate_overrides(args)
    if args.command == "train" and args.output:
        overrides.append(f"train.output_dir={args.output}")
    if args.command == "evaluate" and args.output:
        overrides.append(f"evaluate.output={args.output}")
    config = load_run_config(args.config, overrides, beam_options)

    if args.command in BEAM_COMMANDS and args.dry_run:
        _dry_run(config, args.dry_run)
        return
    if args.command in BEAM_COMMANDS:
        from pipelines.run import check_writable

        check_writable(config.generate.output, "generate.output")
        _log_to(config.generate.output, "generate.output")
    if args.command == "generate":
        from pipelines.run import generate

        generate(config.generate)
    elif args.command == "train":
        from embedder.train import train

        train_config = config.train_config()
        _log_to(posixpath.dirname(train_config.output_dir.rstrip("/")) or ".", "train.output_dir")
        print(train(train_config, args.data or config.generate.output, resume=args.resume))
    elif args.command == "evaluate":
        from pipelines.run import evaluate

        config = _evaluate_overrides(config, args)
        _log_to(posixpath.dirname(config.evaluate.output.rstrip("/")) or ".", "evaluate.output")
        evaluate(config.evaluate)
    elif args.command == "run":
        from pipelines.run import run_all

        run_all(config, resume=args.resume)


def _dry_run(config, output_format: str) -> None:
    """Only generation calls models: `run --dry-run` estimates the same as `generate --dry-run` (training and
    evaluation run locally and cost nothing)."""
    import json

    from pipelines.dry_run import estimate, format_table

    logs.attach_file(None)
    result = estimate(config.generate)
    print(json.dumps(result.as_dict(), indent=1) if output_format == "json" else format_table(result, config.generate))


if __name__ == "__main__":
    sys.exit(main())
