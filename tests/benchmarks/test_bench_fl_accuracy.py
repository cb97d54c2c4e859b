"""The federated accuracy benchmark's data: the sample task split over sites, grades skewed per site."""


def test_the_split_skews_grades_per_site_and_shares_the_test_set(tmp_path):
    from benchmarks.fl_accuracy import split_over_sites
    from fpt_monai.data import SAMPLE_CLASSES, make_sample_dataset

    data = make_sample_dataset(tmp_path / "data", num_train=15, num_val=15, num_test=3, image_size=64, progress=False)
    sites = split_over_sites(data, tmp_path / "sites", num_sites=3)
    assert len(sites) == 3
    for split in ("train", "val"):
        counts = [[site["counts"][split][name] for name in SAMPLE_CLASSES] for site in sites]
        assert counts == [[3, 1, 1], [1, 3, 1], [1, 1, 3]]  # 5 images per grade: 3 to its site, 1 to each other
        assert sum(map(sum, counts)) == 15  # each image at exactly one site
    for site in sites:
        assert sum(site["counts"]["test"].values()) == 3  # every site holds the whole test split
    names = {p.name for p in (tmp_path / "sites").rglob("*.png") if "train" in p.parts}
    assert len(names) == 15
