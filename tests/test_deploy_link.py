"""FlowerLink over a stand-in Grid: which node is which site, and one exchange with its
timeouts and error replies, without starting any Flower process."""

import time
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr", minversion="1.42")

from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from medfed.deploy.link import EXCHANGE, RECORD, SITE_QUERY, FlowerLink, payload_content, payload_of


class FakeGrid:
    """The Grid calls FlowerLink makes. ``answer(node, message)`` returns the node's reply
    (None: it never answers); replies appear ``delay`` pulls after the push."""

    def __init__(self, nodes, answer, delay=1, registered=None):
        self.nodes = list(nodes)
        self.registered = registered or {}
        self.answer = answer
        self.delay = delay
        self.inbox = {}  # message id -> [pulls left, reply]
        self.pushed = []
        self.pulls = 0

    def get_node_ids(self):
        return list(self.nodes)

    def get_nodes(self):
        return [SimpleNamespace(node_id=n, name=self.registered.get(n, "")) for n in self.nodes]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            self.pushed.append(m)
            reply = self.answer(m.metadata.dst_node_id, m)
            if reply is not None:
                self.inbox[m.object_id] = [self.delay, reply]
            ids.append(m.object_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for mid in message_ids:
            if mid in self.inbox:
                self.inbox[mid][0] -= 1
                if self.inbox[mid][0] <= 0:
                    out.append(self.inbox.pop(mid)[1])
        return out


@pytest.fixture(autouse=True)
def run_identity():
    """Flower stamps the current task's run, node and task ids on every new message."""
    before = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


def site_reply(name):
    def answer(node, message):
        return Message(RecordDict({RECORD: ConfigRecord({"site": name(node)})}), reply_to=message)
    return answer


def test_sites_maps_names_to_nodes_and_ignores_unknown_and_duplicate_nodes(caplog):
    names = {1: "a", 2: "b", 3: "intruder", 4: "a"}
    grid = FakeGrid(names, site_reply(names.get))
    with caplog.at_level("WARNING", logger="medfed.deploy"):
        found = FlowerLink(grid, poll_s=0.001).sites(["a", "b"], timeout_s=5)
    assert found == {"a": 1, "b": 2}
    assert {m.metadata.message_type for m in grid.pushed} == {SITE_QUERY}
    assert "'intruder', which the study does not name" in caplog.text
    assert "node 4 also says it is site 'a' (node 1 was first)" in caplog.text


def test_a_node_posing_as_another_registered_site_is_ignored(caplog):
    claims = {1: "a", 2: "a"}
    grid = FakeGrid(claims, site_reply(claims.get), registered={1: "b", 2: "a"})
    with caplog.at_level("WARNING", logger="medfed.deploy"):
        found = FlowerLink(grid, poll_s=0.001).sites(["a", "b"], timeout_s=0.2)
    assert found == {"a": 2}
    assert "node 1 says it is site 'a' but its key was registered as 'b'" in caplog.text


def test_sites_returns_what_answered_by_the_deadline(caplog):
    grid = FakeGrid([1, 2], lambda node, m: site_reply(lambda n: "a")(node, m) if node == 1 else None)
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="medfed.deploy"):
        found = FlowerLink(grid, poll_s=0.01).sites(["a", "b"], timeout_s=0.3)
    assert found == {"a": 1}
    assert 0.3 <= time.monotonic() - start < 2
    assert "no node answered as 'b' within 0.3 s" in caplog.text


def test_exchange_carries_each_sites_bytes_and_names_missing_replies():
    names = {1: "a", 2: "b", 3: "c"}
    big = bytes(range(256)) * 50_000  # 12.8 MB: more than one of Flower's 5 MiB chunks

    def answer(node, message):
        if message.metadata.message_type == SITE_QUERY:
            return site_reply(names.get)(node, message)
        assert message.metadata.message_type == EXCHANGE
        if names[node] == "b":
            return Message(Error(code=0, reason="site b broke"), reply_to=message)
        if names[node] == "c":
            return None  # never answers
        return Message(payload_content(payload_of(message)[::-1]), reply_to=message)

    link = FlowerLink(FakeGrid(names, answer), poll_s=0.01)
    assert link.sites(["a", "b", "c"], timeout_s=5) == {"a": 1, "b": 2, "c": 3}
    start = time.monotonic()
    out = link.exchange({"a": big, "b": b"x", "c": b"y", "d": b"z"}, timeout_s=0.2)
    assert out["a"] == big[::-1]
    assert out["b"] == "error: site b broke (code 0)"
    assert out["c"] == "timeout after 0.2 s"
    assert out["d"] == "not connected"
    assert list(out) == ["a", "b", "c", "d"]
    assert time.monotonic() - start < 2


def test_exchange_polls_at_poll_s_not_flowers_3_s():
    """A reply that comes on the third pull arrives after about two poll intervals."""
    names = {1: "a"}

    def answer(node, message):
        if message.metadata.message_type == SITE_QUERY:
            return site_reply(names.get)(node, message)
        return Message(payload_content(b"ok"), reply_to=message)

    grid = FakeGrid(names, answer, delay=3)
    link = FlowerLink(grid, poll_s=0.02)
    link.sites(["a"], timeout_s=5)
    start, pulls, waited = time.monotonic(), grid.pulls, link.wait_s
    assert link.exchange({"a": b"hi"}, timeout_s=10) == {"a": b"ok"}
    assert grid.pulls - pulls == 3
    assert time.monotonic() - start < 1.0
    assert link.wait_s - waited >= 2 * 0.02  # the two waits between the three pulls, counted


def test_a_push_the_superlink_refuses_is_a_reason_for_every_site():
    """Flower's grid returns no message ids at all when the request was too large."""
    names = {1: "a", 2: "b"}
    grid = FakeGrid(names, site_reply(names.get))
    link = FlowerLink(grid, poll_s=0.01)
    link.sites(["a", "b"], timeout_s=5)
    grid.push_messages = lambda messages: []
    assert link.exchange({"a": b"x", "b": b"y"}, timeout_s=1) == {
        s: "error: the SuperLink refused the message (too large, or an unknown node)" for s in "ab"}


def test_poll_must_be_positive():
    with pytest.raises(ValueError, match="poll_s must be > 0"):
        FlowerLink(FakeGrid([], None), poll_s=0)
