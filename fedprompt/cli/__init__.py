"""The ``fedprompt`` command line: one module per command group, wired here."""

from __future__ import annotations

import argparse
import sys

from fedprompt.errors import FedPromptError


def build_parser() -> argparse.ArgumentParser:
    from fedprompt.cli.certs import add_certs_parser, add_health_parser
    from fedprompt.cli.models import add_datasets_parser, add_models_parser
    from fedprompt.cli.task import add_task_parser
    from fedprompt.cli.tuning import add_eval_parser, add_tune_parser
    from fedprompt.client.daemon import add_client_parser
    from fedprompt.client.dpopt.cli import add_dpopt_parser
    from fedprompt.demo import add_demo_parser
    from fedprompt.dp.cli import add_budget_parser
    from fedprompt.server.aggregation.cli import add_aggregator_parser, add_prompts_parser, add_registry_parser
    from fedprompt.server.coordinator.cli import add_front_parser, add_server_parser, add_superlink_parser
    from fedprompt.server.post.cli import add_post_parser
    from fedprompt.server.post.demo import add_demo_post_parser

    parser = argparse.ArgumentParser(
        prog="fedprompt", description="fedprompt: privacy-preserving federated prompt tuning"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        add_models_parser,
        add_datasets_parser,
        add_tune_parser,
        add_eval_parser,
        add_budget_parser,
        add_task_parser,
        add_certs_parser,
        add_health_parser,
        add_server_parser,
        add_superlink_parser,
        add_front_parser,
        add_aggregator_parser,
        add_prompts_parser,
        add_registry_parser,
        add_client_parser,
        add_dpopt_parser,
        add_demo_parser,
        add_post_parser,
        add_demo_post_parser,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "models" and args.action != "list" and not args.name:
        print(f"error: models {args.action} needs a {'FOLDER' if args.action == 'add' else 'NAME'}", file=sys.stderr)
        return 2
    if args.command == "budget" and (args.action in ("backup", "restore")) != bool(args.path):
        print("error: budget backup and restore take a PATH (and only they do)", file=sys.stderr)
        return 2
    if args.command == "budget" and args.action == "set" and args.budget_epsilon is None:
        print("error: budget set needs --budget-epsilon (and --budget-delta on a new ledger)", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except FedPromptError as exc:  # errors a user can cause; anything else is a bug and keeps its traceback
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
