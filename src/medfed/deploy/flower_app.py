"""medfed's Flower app: the ServerApp runs the coordinator, the ClientApp runs the site.

The generated ``pyproject.toml`` (:class:`medfed.deploy.processes.FlowerApp`) names
``medfed.deploy.flower_app:server_app`` and ``:client_app``. The ServerApp's run config
carries ``study`` (a study file), ``out`` (the output folder) and ``poll-s`` (how often it
pulls replies); the ClientApp learns its site from the SuperNode's ``--node-config``.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from medfed.deploy import coordinator, site
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
    coordinator.drive(FlowerLink(grid, poll_s=float(config.get("poll-s", 0.05))), config)


@client_app.query("medfed_site")
def which_site(message: Message, context: Context) -> Message:
    """Answer the coordinator's question which site this node is."""
    content = RecordDict({RECORD: ConfigRecord({"site": str(context.node_config["site"])})})
    return Message(content, reply_to=message)


@client_app.train("medfed_exchange")
def exchange(message: Message, context: Context) -> Message:
    """Hand the request's bytes to the site program and send back its reply."""
    reply = site.handle(payload_of(message), context.node_config)
    return Message(payload_content(reply), reply_to=message)
