"""A node preempted mid-epoch (drained with a deadline, as a cloud reclaims a spot instance) on a
real multi-node Ray cluster (several raylets on this machine): the workers checkpoint within the
drain window, stop training until Ray Train restarts the group, and the run goes on from that
checkpoint; a preemption is not one of `train.max_failures` (0 here)."""

from __future__ import annotations

from multinode import run_script


def test_a_drained_node_gets_a_checkpoint_within_its_deadline_and_no_step_after_it_is_lost(digits_data, tmp_path):
    report = run_script("preemption.py", str(tmp_path), str(digits_data[0]))
    assert report["error"] is None and report["final_step"] == report["total_steps"]

    noticed = [c for c in report["checkpoints"] if c["preemption"]]
    assert len(noticed) == 1, report["checkpoints"]
    preemption, at = noticed[0]["preemption"], noticed[0]["step"]
    assert at >= report["drained_after_step"]
    assert report["drained_at"] * 1000 <= preemption["noticed_ms"] <= preemption["deadline_ms"]
    assert preemption["ranks"] and len(preemption["nodes"]) == 1

    per_epoch = report["steps_per_epoch"]
    steps_of: dict[int, list[int]] = {}
    for record in report["trace"]:
        steps_of.setdefault(record["pid"], []).append(record["epoch"] * per_epoch + record["epoch_step"] + 1)
    before = {pid: steps for pid, steps in steps_of.items() if min(steps) == 1}
    after = {pid: steps for pid, steps in steps_of.items() if min(steps) > 1}
    assert len(before) == 2 and len(after) == 2, {pid: (min(s), max(s)) for pid, s in steps_of.items()}
    # Nothing the preempted group trained is lost: it stopped at the checkpoint, the new one began after it.
    assert max(max(steps) for steps in before.values()) == at
    assert {min(steps) for steps in after.values()} == {at + 1}
    # What the run's reports tell (and summary.json and the report record): the notice, and the
    # group restored from that checkpoint with nothing lost.
    assert [(e["kind"], e["step"]) for e in report["events"]] == [("preemption", at), ("restore", at)]
    assert report["events"][1]["lost_steps"] == 0 and report["events"][1]["workers"] == 2
    print(f"preemption: notice {(preemption['noticed_ms'] / 1000 - report['drained_at']):.1f} s after the drain "
          f"({at - report['drained_after_step']} steps), {(preemption['deadline_ms'] - preemption['noticed_ms']) / 1000:.1f} s "
          f"before its deadline; no step lost")
