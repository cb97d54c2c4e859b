"""The bytes-per-round table of federated training: counts of the networks on the meta device."""


def test_each_round_moves_exactly_the_learnable_parameters_of_each_method():
    from benchmarks.fl_bytes import fl_bytes_markdown, run

    result = run(command="python -m benchmarks fl_bytes")
    rows = {(row["backbone"].split()[0], row["method"]): row for row in result["rows"]}
    assert len(rows) == 8
    # the papers' counts at ViT-B/16 (README's presets table), and the demo network's
    assert rows["ViT-B/16", "fpt"]["values"] == 1_602_341 and rows["ViT-B/16", "fpt_plus"]["values"] == 900_965
    assert rows["demo", "fpt"]["values"] == 251_139 and rows["demo", "lora"]["values"] == 186_115
    for row in rows.values():
        assert row["sent_bytes"] == row["received_bytes"] == 4 * row["values"]  # float32, both ways
        assert row["round_bytes"] == 2 * row["sent_bytes"] <= 2 * row["whole_model_bytes"]
    assert rows["ViT-B/16", "full"]["share_of_whole"] == 1.0
    assert rows["ViT-B/16", "fpt"]["round_bytes"] < rows["ViT-B/16", "full"]["round_bytes"] / 50
    assert "| ViT-B/16 at 512 | fpt | 157 | 1,602,341 | 6.41 MB |" in fl_bytes_markdown(result)
