"""Losing a node mid-run, on a real multi-node Ray cluster (several raylets on this machine)."""

from __future__ import annotations

from multinode import run_script


def test_node_loss_recovers_or_fails_clearly(digits_data, tmp_path):
    report = run_script("node_loss.py", str(tmp_path), str(digits_data[0]))

    recovered = report["recovered"]
    assert recovered["node_removed"] and recovered["nodes_left"] == 3  # head + 2 worker nodes
    assert recovered["final_step"] == report["expected_steps"]

    failed = report["too_little_left"]
    assert failed["error"] is not None
    assert "the cluster now has 1 CPU (short by 1 CPU)" in failed["error"]
    # Two 10 s placement attempts (the first try and max_failures=1 retry) plus restarts: bounded.
    assert failed["seconds_after_removal"] < 120
    print(f"node loss: the recovered run took {recovered['seconds']} s from the cluster's start; the failing one "
          f"ended {failed['seconds_after_removal']:.1f} s after its node left")
