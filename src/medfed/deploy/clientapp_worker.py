"""A long-lived ClientApp process for one SuperNode: medfed's ClientApp run in-process for
every message, instead of a new ``flwr-clientapp`` process per message.

Flower's SuperNode (``--isolation subprocess``, its default) starts a SuperExec that starts a
fresh ``flwr-clientapp`` process for each message; importing Flower and medfed there takes
1.3-1.45 s on this 2-core machine, per site per round. With ``--isolation process``
the SuperNode leaves its tasks to any executor that polls its Runtime API; this worker is
such an executor. It does per task what ``flwr-clientapp`` does, with Flower's own functions
(pull the task input, run the ClientApp, push the reply and the task's output), but keeps
its imports and runs only medfed's ClientApp: a run of any other Flower app is answered with
an error reply. The ClientApp still runs outside the SuperNode process, as in Flower.

Run as ``python -m medfed.deploy.clientapp_worker --runtime-api-address HOST:PORT
[--poll-s 0.05] [--parent-pid PID]``; it exits when its parent does.
"""

from __future__ import annotations

import argparse
import io
import logging
import time
import zipfile

import tomllib

from medfed.deploy.flower_patches import quick_object_retries
from medfed.deploy.processes import CLIENT_APP

LOG = logging.getLogger("medfed.deploy.worker")


def fab_clientapp(fab_content: bytes) -> str:
    """The ClientApp a FAB names in ``[tool.flwr.app.components]``."""
    with zipfile.ZipFile(io.BytesIO(fab_content)) as fab:
        config = tomllib.loads(fab.read("pyproject.toml").decode())
    return str(config["tool"]["flwr"]["app"]["components"].get("clientapp", ""))


def run_task(address: str, token: str, client_app) -> str:
    """Run one claimed task (one message) through ``client_app``; its final sub-status."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())

    def beat() -> bool:
        # Flower's own heartbeat function raises SIGINT when the task is gone, which would end
        # this worker with it; here a lost task only stops the beats
        try:
            return bool(client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)
        except Exception:  # noqa: BLE001 - the sender retries and the task ends anyway
            return False

    heartbeat = HeartbeatSender(beat)  # a task without beats expires after 30 s
    message = context = None
    sub_status, details = SubStatus.FAILED, "the ClientApp did not run"
    try:
        heartbeat.start()
        message, context, _run, fab = pull_task_input(client)
        named = fab_clientapp(fab.content)
        if named != CLIENT_APP:
            raise RuntimeError(f"this site runs {CLIENT_APP} only; the run's app names {named!r}")
        reply = client_app(message=message, context=context)
        LOG.info("ClientApp answered %s", message.metadata.message_type)
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as exc:  # noqa: BLE001 - the coordinator gets the reason as an error reply
        LOG.exception("the ClientApp failed")
        details = f"{type(exc).__name__}: {exc}"
        reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message) \
            if message is not None else None
    finally:
        if heartbeat.is_running:
            heartbeat.stop()
    try:
        if reply is not None and context is not None:
            push_message(client, reply, context)
    finally:
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        client.close()
    return sub_status


def serve(address: str, poll_s: float, parent_pid: int | None) -> None:
    """Claim ClientApp tasks from the SuperNode at ``address`` until the parent exits (Flower's
    monitor raises SIGINT then, which ends this loop)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime import run_clientapp

    from medfed.deploy.flower_app import client_app

    # a task is claimable before the SuperNode has all of its message's objects
    quick_object_retries(run_clientapp, poll_s)
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)  # as flwr-clientapp does: end with the SuperNode

    acquire = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    LOG.info("medfed ClientApp worker polling %s every %g s", address, poll_s)
    while True:
        response = acquire.AcquireTask(request)
        if response.HasField("task") and response.token:
            LOG.info("task %s claimed", response.task.task_id)
            try:
                run_task(address, response.token, client_app)
            except Exception:  # noqa: BLE001 - one failed task (its reply lost) must not end the site
                LOG.exception("task %s could not be completed", response.task.task_id)
        else:
            time.sleep(poll_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--poll-s", type=float, default=0.05)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s medfed-worker: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    serve(args.runtime_api_address, args.poll_s, args.parent_pid)


if __name__ == "__main__":
    main()
