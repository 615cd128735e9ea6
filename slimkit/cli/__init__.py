"""The command line: app.py (parser, logging, exit codes), options.py (shared flags and types),
deploy_verbs.py (extract, export, bench, compare, models) and train_verbs.py (evolve, train, merge, den)."""


def main(argv=None) -> int:
    from slimkit.cli.app import main as run

    return run(argv)
