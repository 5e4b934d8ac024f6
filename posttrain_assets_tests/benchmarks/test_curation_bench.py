"""The curation throughput figure runs end to end on a few texts (no timing is asserted: figures go to the docs)."""

from benchmarks.curation_bench import curation_throughput


def test_curation_throughput_embeds_and_selects_half() -> None:
    result = curation_throughput(200, seed=3)
    assert (result["texts"], result["selected"], result["model"]) == (200, 100, "wordllama/l2_supercat_256")
    assert result["words"] > 200 * 20
    cover = result["coverage"]
    assert cover["rows"] == 100 and cover["mean_distance"] < cover["random_mean_distance"]
