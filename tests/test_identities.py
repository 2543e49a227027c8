"""Node identities: which client each node is, the sites refused, and the federation's fingerprints."""

from __future__ import annotations

from flwr.app import Error, Message
from flwr.supercore.task_identity import TaskIdentity

from fedprime_core.config import parse_run_config
from fedprime_protocol.messages import SITE_CHECK, identity_reply_content
from server_app.identities import NodeIdentities
from server_app.sites import SiteVerdict
from server_app.transport import Transport


class IdentityGrid:
    """Nodes that answer the identity query with ``answers[node]``: a client record, an error text, or nothing."""

    pull_interval = 0.01

    def __init__(self, answers) -> None:
        TaskIdentity.task_id = TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0
        self.answers = answers
        self.asked: list[int] = []
        self.replies: dict[str, Message] = {}

    def push_messages(self, messages):
        ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            self.asked.append(node)
            message.metadata.__dict__["_message_id"] = f"q-{node}"
            ids.append(message.metadata.message_id)
            answer = self.answers.get(node)
            if isinstance(answer, str):
                self.replies[f"q-{node}"] = Message(Error(code=1, reason=answer), reply_to=message)
            elif answer is not None:
                record, check = answer if isinstance(answer, tuple) else (answer, None)
                self.replies[f"q-{node}"] = Message(content=identity_reply_content(record, check), reply_to=message)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(mid) for mid in list(message_ids) if mid in self.replies]


def _identities(clients=None, **fingerprints) -> NodeIdentities:
    transport = Transport(parse_run_config({"round-timeout": 0.1}))
    return NodeIdentities(transport, {} if clients is None else clients, **fingerprints)


def test_identify_asks_new_nodes_once_and_leaves_out_those_it_cannot_tell_apart():
    grid = IdentityGrid(
        {
            1: {"client-id": "site-a", "num-train": 40},
            2: {"client-id": "site-b"},
            3: "[data] DataError: no train.jsonl",
            5: {"client-id": "site-a"},  # claims node 1's client
            6: {"num-train": 3},  # no client id
        }
    )
    identities = _identities()
    outcomes = []
    usable = identities.identify(grid, [1, 2, 3, 4, 5, 6], 1, outcomes)
    assert usable == [1, 2]
    assert identities.node_clients == {1: "site-a", 2: "site-b", 5: "site-a"}
    assert identities.known_train(1) == 40 and identities.known_train(2) is None
    reasons = {o.node: (o.status, o.reason, o.kind) for o in outcomes}
    assert reasons[3] == ("rejected", "no identity: client error: DataError: no train.jsonl", "data")
    assert reasons[4] == ("timed-out", "no reply to the identity query within round-timeout 0.1s", None)
    assert reasons[5][:2] == ("rejected", "client-id 'site-a' is also claimed by node 1")
    assert reasons[6][0] == "rejected" and reasons[6][1].startswith("no identity: ")
    grid.asked.clear()
    assert identities.identify(grid, [1, 2], 2, []) == [1, 2] and grid.asked == []  # known nodes: not asked again


def test_a_site_met_after_round_one_is_checked_and_a_refused_one_never_sampled():
    clients = {}
    identities = _identities(clients, labels_fingerprint="L1")
    bad = ({"client-id": "site-x"}, {"ok": False, "problems": ["data-dir /x does not exist"]})
    other_labels = ({"client-id": "site-y"}, {"ok": True, "num-train": 10, "labels-fingerprint": "L2"})
    good = ({"client-id": "site-z"}, {"ok": True, "num-train": 10, "labels-fingerprint": "L1"})
    outcomes = []
    usable = identities.identify(IdentityGrid({1: bad, 2: other_labels, 3: good}), [1, 2, 3], 4, outcomes)
    assert usable == [3]
    assert sorted(identities.refused) == [1, 2] and 3 not in identities.refused
    outcomes.sort(key=lambda o: o.node)  # in the order the replies arrived
    assert [(o.node, o.status, o.kind) for o in outcomes] == [(1, "rejected", "data"), (2, "rejected", "data")]
    assert "does not exist" in outcomes[0].reason and "class list" in outcomes[1].reason
    assert clients["site-x"]["state"] == clients["site-y"]["state"] == "refused"
    assert clients["site-z"]["state"] == "checked"
    assert identities.sites_only is True


def test_census_records_and_verdicts_before_round_one():
    identities = _identities()
    identities.learn_census({1: {"client-id": "a", "num-train": 5, SITE_CHECK: {"ok": True}}, 2: {"num-train": 1}})
    assert identities.node_clients == {1: "a"}
    assert identities.node_records == {1: {"client-id": "a", "num-train": 5}, 2: {"num-train": 1}}
    refused = SiteVerdict(2, "b", refused=True, problems=("bad rows",))
    identities.take_verdicts([SiteVerdict(1, "a", check={"ok": True}), refused])
    assert identities.refused == {2: "bad rows"}
    identities.take_verdicts([SiteVerdict(3, "c")])  # a partition of the run's data: not a site
    assert identities.sites_only is False


def test_the_counts_of_a_sites_passed_data_check_bound_its_replies_and_a_failed_checks_do_not():
    identities = _identities()
    checked = {"ok": True, "num-train": 40, "num-val": 5, "num-test": 20, "num-classes": 3}
    identities.learn_census(
        {
            1: {"client-id": "a", SITE_CHECK: checked},
            2: {"client-id": "b", SITE_CHECK: {"ok": False, "num-train": 10**6}},
            3: {"client-id": "c", "partition-id": 2, "num-partitions": 4},  # a partition: no check, no counts
        }
    )
    assert identities.known_counts(1) == {"num-train": 40, "num-val": 5, "num-test": 20}
    assert identities.known_train(1) == 40
    assert identities.known_counts(2) == identities.known_counts(3) == identities.known_counts(9) == {}
    # A site met after round 1: the counts of the check it sent with its identity.
    late = ({"client-id": "site-z"}, {"ok": True, "num-train": 12, "num-val": 3, "num-test": 7})
    assert identities.identify(IdentityGrid({4: late}), [4], 3, []) == [4]
    assert identities.known_counts(4) == {"num-train": 12, "num-val": 3, "num-test": 7}


def test_the_first_fingerprint_sets_the_reference_and_another_is_refused_for_what_it_is():
    identities = _identities(backbone_fingerprint="B1")
    assert identities.reference_problems({}) == []
    assert identities.reference_problems({"backbone-fingerprint": "B1", "labels-fingerprint": "L1"}) == []
    assert identities.reference_labels == "L1"  # the first class list seen is the federation's
    [backbone] = identities.reference_problems({"backbone-fingerprint": "B2"})
    assert "frozen backbone fingerprint B2 differs from the federation's B1" in backbone
    both = identities.reference_problems({"backbone-fingerprint": "B2", "labels-fingerprint": "L2"})
    assert len(both) == 2 and "class list fingerprint L2 differs" in both[1]


def test_a_resumed_run_without_server_data_checks_replies_against_its_recorded_fingerprint(quick_config):
    """No reply can set the backbone fingerprint of a resumed run: it is the one the checkpoint recorded
    (the server's own when it loads its backbone anyway: a fresh run, or server-side evaluation)."""
    from pathlib import Path

    import numpy as np

    from fedprime_core import runtime
    from fedprime_core.config import config_to_dict
    from fedprime_core.results import save_checkpoint
    from server_app.app import prepare_run, server_fingerprint

    cfg = quick_config(method="fed-intra", run_name="first")
    folder = Path(cfg.results_dir) / "first"
    folder.mkdir(parents=True)
    save_checkpoint(folder, {"x": np.zeros(1)}, {"round": 1, "config": config_to_dict(cfg), "fingerprint": "B1"})
    resumed = quick_config(method="fed-intra", run_name="first", resume=str(folder))
    recorded = prepare_run(resumed)[-1]
    assert recorded == "B1" and prepare_run(quick_config(method="fed-intra", run_name="fresh"))[-1] is None
    assert server_fingerprint(resumed, False, resumed=True, recorded=recorded) == "B1"
    own = runtime.process_backbone(resumed).fingerprint
    assert server_fingerprint(resumed, True, resumed=True, recorded=recorded) == own
    assert server_fingerprint(cfg, False, resumed=False, recorded=None) == own
    identities = _identities(backbone_fingerprint=server_fingerprint(resumed, False, resumed=True, recorded=recorded))
    assert "differs from the federation's B1" in identities.reference_problems({"backbone-fingerprint": "evil"})[0]
    assert identities.reference_problems({"backbone-fingerprint": "B1"}) == []
