"""An elastic worker group (`train.workers: [min, max]`) on a real multi-node Ray cluster (several
raylets on this machine): it shrinks when a node leaves and grows when one comes back, each time
continuing from the latest checkpoint on the new worker count."""

from __future__ import annotations

from multinode import run_script


def test_a_worker_range_shrinks_when_a_node_leaves_and_grows_when_it_comes_back(digits_data, tmp_path):
    report = run_script("elastic.py", str(tmp_path), str(digits_data[0]))
    assert report["final_step"] == report["total_steps"]

    # The worker count of each checkpoint: 2, then 1 once the node left, then 2 again once it came back.
    counts = [p["workers"] for p in report["positions"]]
    changes = [count for i, count in enumerate(counts) if i == 0 or count != counts[i - 1]]
    assert changes == [2, 1, 2], counts
    steps = [p["step"] for p in report["positions"]]
    assert steps == sorted(steps) and steps[-1] == report["total_steps"]

    # Each group after the first began at the step after the latest checkpoint before it: no older one.
    per_epoch = report["steps_per_epoch"]
    groups: dict[int, list[int]] = {}  # a worker process -> the steps it trained
    for record in report["trace"]:
        groups.setdefault(record["pid"], []).append(record["epoch"] * per_epoch + record["epoch_step"] + 1)
    starts = sorted({min(trained) for trained in groups.values()})
    assert starts[0] == 1 and len(starts) == 3, starts  # the first group, the shrunk one, the grown one
    for start in starts[1:]:
        taken_before = [s for s in steps if s < start]
        assert taken_before and start == taken_before[-1] + 1, (start, steps)

    # The reports tell both resizes, each with the step it went on from and the steps the group
    # before it had trained past that (rank 0's progress, at most a step behind; a micro batch in
    # the trace may not have become a step).
    events = report["events"]
    assert [(e["kind"], e["workers"], e["step"] + 1) for e in events] == [("resize", 1, starts[1]), ("resize", 2, starts[2])]
    for event, previous in zip(events, starts):
        reached = max(max(trained) for trained in groups.values() if min(trained) == previous)  # the lost group's last
        assert reached - event["step"] - 2 <= event["lost_steps"] <= reached - event["step"], (event, reached)
