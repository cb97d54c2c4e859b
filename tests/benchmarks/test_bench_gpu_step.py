"""The GPU training-step benchmark, run on the CPU with the tiny presets: both arms, rows and table."""


def test_gpu_step_times_both_paths_and_reports_memory_only_on_cuda():
    from benchmarks.gpu_step import GPU_STEP_ARMS, gpu_step_comparison, gpu_step_table

    rows = gpu_step_comparison(("fpt_plus_tiny",), batch_size=2, device="cpu", repeats=1)
    assert [row["kernels"] for row in rows] == list(GPU_STEP_ARMS)
    assert all(row["images_per_second"] > 0 and row["amp"] is False for row in rows)
    assert all(row["peak_cuda_mib"] is None for row in rows)  # CUDA memory is measured on CUDA only
    assert "| fpt_plus_tiny | reference | cpu | False | 2 |" in gpu_step_table(rows)
