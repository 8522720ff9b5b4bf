"""``flower-supernode`` with shorter waits, and optionally medfed's long-lived ClientApp
worker beside it.

``--medfed-poll-s S`` caps the SuperNode loop's fixed 3 s wait between pulls (and its 0.5 s
looks for a reply) at S, and retries a message's not-yet-uploaded objects after S instead of
1 s (:mod:`medfed.deploy.flower_patches`); each pull is one authenticated HTTPS request to
the SuperLink. ``--medfed-worker`` (with ``--isolation process``) also starts
:mod:`medfed.deploy.clientapp_worker` on the SuperNode's Runtime API. Every other argument
goes to Flower's own ``flower-supernode`` entry point, run in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys


def _take(args: list[str], flag: str, has_value: bool) -> str | bool | None:
    """Remove ``flag`` (and its value) from ``args``; the value, True, or None if absent."""
    if flag not in args:
        return None
    i = args.index(flag)
    value = args[i + 1] if has_value else True
    del args[i: i + (2 if has_value else 1)]
    return value


def _value(args: list[str], flag: str, default: str) -> str:
    return args[args.index(flag) + 1] if flag in args else default


def main() -> None:
    args = sys.argv[1:]
    poll = _take(args, "--medfed-poll-s", True)
    worker = _take(args, "--medfed-worker", False)
    try:
        import flwr.supernode.start_client_internal as loop
        from flwr.supernode.cli.flower_supernode import flower_supernode

        from medfed.deploy.flower_patches import cap_sleeps, quick_object_retries

        if poll is not None:
            cap_sleeps(loop, float(poll))
            quick_object_retries(loop, float(poll))
    except (ImportError, RuntimeError) as exc:
        sys.exit(f"medfed's SuperNode launcher does not fit this Flower release ({exc}); "
                 "start the site without the fast options")
    if worker:
        address = f"{_value(args, '--host', '127.0.0.1')}:{_value(args, '--port', '9094')}"
        subprocess.Popen([sys.executable, "-m", "medfed.deploy.clientapp_worker", "--runtime-api-address", address,
                          "--poll-s", str(poll or 0.05), "--parent-pid", str(os.getpid())])
    sys.argv = ["flower-supernode", *args]
    flower_supernode()


if __name__ == "__main__":
    main()
