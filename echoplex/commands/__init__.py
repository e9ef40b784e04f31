"""One module per `echoplex` subcommand: `add_arguments(parser)` and `run(args) -> int`."""

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("echoplex.commands.serve", "run an echo server"),
    "client": ("echoplex.commands.client", "talk to an echo server, like nc"),
    "load": ("echoplex.commands.load", "load an echo server with verified traffic, report latency"),
    "bench": ("echoplex.commands.bench", "run every model under the same load and compare"),
    "conditions": (
        "echoplex.commands.conditions",
        "show or change a running server's conditions (its --control-port)",
    ),
    "lesson": ("echoplex.commands.lesson", "the tutorial's experiment, replayed and measured"),
}
