from cluster.resources import groups_that_fit, missing_resources, worker_group_demand


def test_worker_group_fits_or_names_what_is_missing():
    demand = worker_group_demand(workers=3, cpus_per_worker=1.0, use_gpu=True)
    assert demand == {"CPU": 3.0, "GPU": 3.0}
    assert missing_resources({"CPU": 8, "GPU": 2}, demand) == {"GPU": 1.0}
    assert missing_resources({"CPU": 8, "GPU": 4}, demand) == {}


def test_whole_groups_that_fit():
    assert groups_that_fit({"CPU": 2}, worker_group_demand(2, 1.0, False)) == 1
    assert groups_that_fit({"CPU": 9, "GPU": 4}, worker_group_demand(2, 1.0, True)) == 2
    assert groups_that_fit({"CPU": 1}, worker_group_demand(2, 1.0, False)) == 0


def _sweep(space: dict, **tune):
    from runconfig.schema import RunConfig

    return RunConfig.model_validate({"train": {"workers": 2}, "tune": {"enabled": True, "space": space} | tune})


def test_a_sweep_packs_by_its_largest_trial_and_counts_its_waves():
    from tuning.packing import pack, packing_problems

    cfg = _sweep({"train.workers": {"choice": [1, 3]}, "train.lr": {"grid": [0.1, 0.01]}}, num_samples=3)
    packing = pack(cfg, {"CPU": 8})
    assert packing.trials == 6 and packing.demand == {"CPU": 3.0} and packing.concurrent == 2 and packing.waves == 3
    assert "6 trial(s) (random search, asha), each a worker group of up to 3 CPU: 2 at once -> 3 wave(s)" in packing.line(cfg)
    assert pack(_sweep({"train.lr": {"choice": [0.1, 0.01]}, "model.width": {"grid": [8, 16, 32]}}, search="grid"),
                {"CPU": 8}).trials == 6  # search grid: every combination of choices and grids, once
    assert pack(_sweep({"train.workers": {"choice": [1, 3]}}, max_concurrent_trials=1), {"CPU": 8}).concurrent == 1
    assert packing_problems(cfg, {"CPU": 8}) == []
    assert packing_problems(cfg, {"CPU": 2}) == [
        "tune.space.train.workers: the largest trial the sweep can sample is a worker group of 3 CPU but the Ray cluster "
        "has 2 CPU (short by 1 CPU); lower the largest value searched or add nodes"]
    gpu = _sweep({"train.cpus_per_worker": {"uniform": [0.5, 2.0]}, "train.use_gpu": {"choice": [False, True]}})
    assert pack(gpu, {"CPU": 16, "GPU": 4}).demand == {"CPU": 4.0, "GPU": 2.0}
