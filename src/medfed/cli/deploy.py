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


def execute_server(study: Path, certs: Path, address: str, out: Path, resume: bool) -> None:
    import json

    from medfed.cli import common
    from medfed.cli.app import render_table
    from medfed.deploy.launch import serve_study
    from medfed.deploy.processes import DeployError

    status = serve_study(study, certs, address, out, resume=resume, command=common.COMMAND,
                         log=lambda line: console.print(f"[dim]{escape(line)}[/]", highlight=False))
    if not status.ok:
        raise DeployError(f"the study did not finish: {status}")
    doc = json.loads((Path(out) / "results.json").read_text())

    def render() -> None:
        render_table(doc)
        console.print(f"[dim]wrote results.json, results.csv, table.md, models/ to {escape(str(out))}[/]",
                      highlight=False)

    show(render, str(out))


@deploy_app.command("server")
def server(
    study: Annotated[Path, typer.Argument(help="the study: a `medfed run` config with [deploy] sites and no data path")],
    certs: Annotated[Path, typer.Option(help="folder made by `medfed deploy certs`")],
    address: Annotated[str, typer.Option(help="HOST:PORT the SuperLink listens on (the one port sites reach)")],
    out: Annotated[Path, typer.Option(help="output folder: results, models/, status.json, checkpoints")],
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted study from its checkpoints")] = False,
) -> None:
    """The coordinator: a SuperLink with TLS and site authentication, and medfed's run of the study on it."""
    guard(execute_server, study, certs, address, out, resume)


def execute_site(name: str, data: Path, server: str, certs: Path, port: int | None, out: Path | None,
                 fast: bool) -> None:
    import signal
    import threading

    from medfed.deploy.launch import run_site

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    folder = out or Path(f"medfed-site-{name}")
    run_site(name, data, server, certs, folder, port=port, fast=fast, stop=stop,
             log=lambda line: console.print(f"[dim]{escape(line)}[/]", highlight=False))


@deploy_app.command("site")
def site(
    name: Annotated[str, typer.Option(help="this site's name, as in the study's [deploy] sites")],
    data: Annotated[Path, typer.Option(help="this site's table (its own rows only); it never leaves the site")],
    server: Annotated[str, typer.Option(help="HOST:PORT of the coordinator's SuperLink")],
    certs: Annotated[Path, typer.Option(help="folder with the CA certificate and this site's private key")],
    port: Annotated[int | None, typer.Option(help="local port of the SuperNode's ClientApp API [default: a free one]")] = None,
    out: Annotated[Path | None, typer.Option(help="the site's own folder (state, personal models) [default: medfed-site-NAME]")] = None,
    fast: Annotated[bool, typer.Option("--fast/--stock", help="fast: poll often and keep one ClientApp process (rounds in "
                                       "~0.5 s on loopback); stock: Flower's own timings (~5 s per round)")] = True,
) -> None:
    """A hospital: its SuperNode, serving the study from its own file until stopped (Ctrl-C)."""
    guard(execute_site, name, data, server, certs, port, out, fast)


def execute_status(out: Path) -> None:
    from medfed.deploy.launch import study_status

    st = study_status(out)
    lines = [f"state: {st.get('state')}", f"round {st.get('round')}" + (f" of {st['setting']}" if st.get("setting") else "")]
    lines.append(f"sites: {', '.join(st.get('sites', []))}")
    for site, why in (st.get("missing") or {}).items():
        lines.append(f"missing last round: {site} ({why})")
    for site, why in (st.get("rejected") or {}).items():
        lines.append(f"rejected last round: {site} ({why})")
    show(lambda: console.print(escape("\n".join(lines)), highlight=False))


@deploy_app.command("status")
def status(out: Annotated[Path, typer.Argument(help="the output folder of `medfed deploy server`")]) -> None:
    """Where a deployed study stands: its state and a line 'round R/N'."""
    guard(execute_status, out)
