"""medfed's Flower app: the ServerApp runs the coordinator, the ClientApp runs the site.

The generated ``pyproject.toml`` (:class:`medfed.deploy.processes.FlowerApp`) names
``medfed.deploy.flower_app:server_app`` and ``:client_app``. The ServerApp's run config
carries ``program`` (``study``, the default: :mod:`medfed.deploy.coordinator`; or ``echo``:
the bare FedAvg of :mod:`medfed.deploy.echo`), ``study`` (the study file), ``out`` (the
output folder), ``resume`` and ``poll-s`` (how often it pulls replies); the ClientApp learns
its site, data file and folder from the SuperNode's ``--node-config``.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from medfed.deploy import echo, site
from medfed.deploy.link import LOG, RECORD, FlowerLink, payload_content, payload_of

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def serve(grid: Grid, context: Context) -> None:
    # the ServerApp's output is kept by the SuperLink as the run's log (processes.save_run_log)
    if not LOG.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s medfed: %(message)s"))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
    config = dict(context.run_config)
    link = FlowerLink(grid, poll_s=float(config.get("poll-s", 0.05)))
    if config.get("program", "study") == "echo":
        echo.drive(link, config)
        return
    from pathlib import Path

    from medfed.deploy.coordinator import drive
    from medfed.deploy.study import load_study

    study = load_study(Path(str(config["study"])))
    link.sites(study.deploy.sites, float(config.get("join-timeout-s", study.deploy.join_timeout_s)))
    drive(link, Path(str(config["study"])), Path(str(config["out"])), resume=bool(config.get("resume", False)),
          command=str(config.get("command", "")) or None, log=LOG.info)


@client_app.query("medfed_site")
def which_site(message: Message, context: Context) -> Message:
    """Answer the coordinator's question which site this node is."""
    content = RecordDict({RECORD: ConfigRecord({"site": str(context.node_config["site"])})})
    return Message(content, reply_to=message)


@client_app.train("medfed_exchange")
def exchange(message: Message, context: Context) -> Message:
    """Hand the request's bytes to the site program and send back its reply."""
    program = echo if context.run_config.get("program", "study") == "echo" else site
    reply = program.handle(payload_of(message), context.node_config)
    return Message(payload_content(reply), reply_to=message)
