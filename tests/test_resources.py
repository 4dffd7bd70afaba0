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
