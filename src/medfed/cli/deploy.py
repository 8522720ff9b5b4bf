"""``medfed deploy``: medfed on Flower's deployment runtime. ``medfed deploy certs`` makes a test
CA, the server's TLS certificate and each site's node-authentication keys
(:mod:`medfed.deploy.certs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from medfed.cli.common import CONTEXT, console, guard, show, split_list

deploy_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings=CONTEXT,
    help="Deployment on Flower (SuperLink/SuperNode, TLS, node authentication): `medfed deploy certs` makes keys.",
)


def execute_certs(out: Path, sites: list[str] | None, host: str) -> None:
    from medfed.deploy.certs import check_site_names, make_certs

    made = make_certs(out, check_site_names(sites or []), host=host)
    lines = [f"wrote {made.folder}: test CA {made.ca_cert.name}, server certificate {made.server_cert.name} for {made.host}"]
    lines += [f"  site {name}: {keys.private_key.name} (stays at the site), {keys.public_key.name} (register it)"
              for name, keys in made.sites.items()]
    show(lambda: console.print(escape("\n".join(lines)), highlight=False))


@deploy_app.command("certs")
def certs(
    out: Annotated[Path, typer.Option(help="new folder for the certificates and keys")],
    sites: Annotated[str, typer.Option(help="site names, comma-separated: a,b,c")],
    host: Annotated[str, typer.Option(help="the SuperLink's host name or IP address (in its certificate)")] = "127.0.0.1",
) -> None:
    """A test CA, the server's TLS certificate and key, and an ECDSA P-384 key pair per site (certs.json indexes them)."""
    guard(execute_certs, out, split_list(sites), host)
