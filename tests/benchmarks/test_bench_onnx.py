"""The ONNX Runtime benchmark: both arms on the same exported network, figures and table."""


def test_onnx_benchmark_times_both_arms_and_checks_the_export():
    from benchmarks.onnx import onnx_markdown, run_onnx_benchmark

    result = run_onnx_benchmark("fpt_plus_tiny", num_classes=2, batch_sizes=(2,), repeats=1, pretrained=False)
    (row,) = result["results"]
    assert row["batch_size"] == 2 and row["eager_images_per_s"] > 0 and row["onnx_images_per_s"] > 0
    assert row["onnx_to_eager"] > 0 and row["max_abs_difference"] < 1e-3
    assert "| 2 |" in onnx_markdown(result) and "ONNX Runtime / eager" in onnx_markdown(result)
