"""The speed section: alternating timing, synchronisation, every arm runs."""


def test_quick_arms_are_timed_over_repeated_calls():
    import time

    from benchmarks.speed import time_alternating

    calls = {"quick": 0, "slow": 0}

    def arm(name, seconds):
        def run():
            calls[name] += 1
            time.sleep(seconds)
        return run

    result = time_alternating({"quick": arm("quick", 0.002), "slow": arm("slow", 0.05)}, repeats=2, min_seconds=0.04)
    assert calls["slow"] == 3  # one warm-up call and one call per sample
    assert calls["quick"] >= 1 + 2 * 2  # each sample repeats the quick call (for about 0.04 s)
    assert 0.002 <= result["quick"] < 0.02 and 0.05 <= result["slow"] < 0.2  # seconds per call


def test_the_clock_stops_after_synchronizing():
    """On a GPU the arms only queue work; the sample must include the synchronization that waits for it."""
    import time

    from benchmarks.speed import time_alternating

    syncs = []

    def synchronize():
        syncs.append(1)
        time.sleep(0.02)  # the queued work finishing

    result = time_alternating({"a": lambda: None, "b": lambda: None}, repeats=2, warmup=1, min_seconds=0.0,
                              synchronize=synchronize)
    assert len(syncs) == 2 * 2 * (1 + 2)  # before and after every sample of both arms, warm-up included
    assert result["a"] >= 0.02 and result["b"] >= 0.02


def test_speed_functions_run_every_arm():
    """The speed section end to end on small networks (on the CPU; the same code runs on ``device="cuda"``)."""
    from benchmarks.speed import inference_latency, preload_throughput, training_throughput

    training = training_throughput(("linear", "fpt"), batch_size=1, img_size=64, preset="fpt_tiny", repeats=1)
    preload = preload_throughput("fpt_tiny", batch_size=2, img_size=64, repeats=1)
    latency = inference_latency("fpt_tiny", img_size=64, repeats=1)
    assert set(training) == {"linear", "fpt"}
    assert set(preload) == {"kv_extraction", "bare_backbone", "bare_backbone_eager", "bare_backbone_per_image"}
    assert set(latency) == {"fpt_network", "bare_backbone", "bare_backbone_eager"}
    assert all(v > 0 for result in (training, preload, latency) for v in result.values())


def test_extraction_profile_compares_both_paths_per_operator():
    from benchmarks.speed import extraction_profile

    rows = extraction_profile("fpt_tiny", img_size=64, calls=1, top=5)
    assert len(rows) == 6 and rows[-1]["op"] == "total"
    assert rows[-1]["kv_extraction_ms"] > 0 and rows[-1]["bare_backbone_ms"] > 0
    assert any(row["kv_extraction_calls"] for row in rows[:-1])
