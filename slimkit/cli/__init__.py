"""The command line: app.py (parser, logging, exit codes), options.py (shared flags and types),
deploy_verbs.py (extract, export, bench, compare, models) and train_verbs.py (evolve, train, merge, den).

``main`` is the installed ``slimkit`` command (pyproject: ``slimkit.cli:main``); it loads app.py when
called, and app.py imports the verb modules by their own names, never this package."""


def main(argv=None) -> int:
    from slimkit.cli.app import main as run

    return run(argv)
