"""A round's messages hold the global arrays once, not once per client (benchmarks/server_memory.py)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from fedprime_core.wire import WIRE_DTYPES
from fedprime_protocol.messages import ARRAYS, instruction_content, instruction_contents, read_arrays


@pytest.fixture(autouse=True)
def a_flower_task():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def personal_states(n: int) -> dict[int, dict[str, np.ndarray]]:
    """What the server sends ``n`` clients with personal inter pools: shared arrays plus each one's own prompts."""
    rng = np.random.default_rng(0)
    shared = {
        "pools.intra.prompts": rng.standard_normal((20, 1, 64)).astype(np.float32),
        "head.0.weight": rng.standard_normal((128, 64)).astype(np.float32),
        "head.0.bias": np.zeros(128, dtype=np.float32),
    }
    return {
        node: {
            **shared,
            "pools.inter.prompts": rng.standard_normal((20, 1, 64)).astype(np.float32),
            "pools.inter.keys": rng.standard_normal((20, 64)).astype(np.float32),
        }
        for node in range(1, n + 1)
    }


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_every_node_gets_what_it_got_alone_and_the_global_arrays_are_stored_once(dtype):
    states = personal_states(12)
    config = ConfigRecord({"server-round": 3})
    contents = instruction_contents(states, config, dtype)
    assert list(contents) == list(states)
    for node, state in states.items():
        alone = instruction_content(state, config, dtype)
        together = contents[node]
        assert dict(together["wire"]) == dict(alone["wire"]) and together["config"]["server-round"] == 3
        assert list(together[ARRAYS]) == list(state)  # same names, same order
        assert together[ARRAYS].count_bytes() == alone[ARRAYS].count_bytes()  # what bytes-sent counts
        received = read_arrays(together)
        for name, value in read_arrays(alone).items():
            np.testing.assert_array_equal(received[name], value, err_msg=f"node {node}: {name}")
    # Memory: each distinct encoded buffer once; the global arrays' buffers are the same object in every record.
    buffers = {id(a.data): len(a.data) for c in contents.values() for a in c[ARRAYS].values()}
    per_node = {name: len(contents[1][ARRAYS][name].data) for name in states[1]}
    own = per_node["pools.inter.prompts"] + per_node["pools.inter.keys"]
    shared = sum(per_node.values()) - own
    assert sum(buffers.values()) == shared + len(states) * own
    first, last = contents[1][ARRAYS], contents[12][ARRAYS]
    assert first["head.0.weight"].data is last["head.0.weight"].data
    assert first["pools.inter.prompts"].data is not last["pools.inter.prompts"].data


def test_a_global_state_sent_to_every_node_is_encoded_once():
    state = personal_states(1)[1]
    contents = instruction_contents(dict.fromkeys(range(50), state), ConfigRecord(), "float16")
    buffers = {id(a.data) for c in contents.values() for a in c[ARRAYS].values()}
    assert len(buffers) == len(state)


def test_a_rounds_replies_are_not_held_past_its_aggregation(quick_config):
    """Every reply holds a client's whole state: none may survive into evaluation, the checkpoint or the next round."""
    import gc
    import weakref

    from fedprime_core import runtime
    from fedprime_core.config import config_to_dict
    from fedprime_protocol.messages import state_to_record
    from server_app.strategy import FedPrimeStrategy
    from tests.loopback import LoopbackGrid, run_dir_of

    class RecordingGrid(LoopbackGrid):
        def pull_messages(self, message_ids):
            replies = list(super().pull_messages(message_ids))
            self.pulled.extend(weakref.ref(m) for m in replies)
            return replies

    cfg = quick_config(run_name="replies", comm_profile="minimal", fraction_evaluate=0.0, server_eval=False)
    run_dir_of(cfg).mkdir(parents=True)
    state = runtime.initial_state(cfg)
    grid = RecordingGrid(config_to_dict(cfg), 3)
    grid.pulled = []
    alive: dict[int, int] = {}
    strategy = FedPrimeStrategy(cfg, run_dir_of(cfg), state)
    persist = strategy.outputs.persist

    def counting_live_replies(server_round, *args, **kwargs):
        gc.collect()
        alive[server_round] = sum(ref() is not None for ref in grid.pulled)
        persist(server_round, *args, **kwargs)

    strategy.outputs.persist = counting_live_replies  # when each round's results are written
    strategy.start_or_resume(grid, state_to_record(state), num_rounds=2)
    assert len(grid.pulled) == 3 + 2 * 3  # identity replies, then two rounds of train replies
    assert alive == {1: 0, 2: 0}
