"""The feature-cache benchmark (`benchmarks/feature_cache.py`) end to end on a tiny random model and the fixtures."""

import dataclasses

import pytest
from testing_utils import HH, MINIATURE, ULTRAFEEDBACK

from benchmarks.feature_cache import VARIANTS, FeatureCacheConfig, benchmark, markdown
from iav_trl import IAVConfig

DEFAULT_LAMBDA_KL = {field.name: field.default for field in dataclasses.fields(IAVConfig)}["lambda_kl"]


@pytest.fixture(scope="module")
def results(tiny_model, tmp_path_factory):  # noqa: F811
    settings = {k: v for k, v in MINIATURE.items() if k in FeatureCacheConfig.__dataclass_fields__}
    settings.update(epochs=2.0, iav_learning_rate=1e-2, dpo_learning_rate=1e-2, target_kl=0.01)
    output_dir = str(tmp_path_factory.mktemp("results"))
    paths = dict(hh_rlhf=[HH], ultrafeedback=[ULTRAFEEDBACK], output_dir=output_dir)
    config = FeatureCacheConfig(model=tiny_model, **paths, **settings)
    return benchmark(config)


def test_every_variant_trains_the_same_steps_and_the_bar_is_computed(results):
    runs = results["runs"]
    assert list(runs) == list(VARIANTS)
    assert len({run["steps"] for run in runs.values()}) == 1 and runs["iav"]["steps"] > 0
    assert all(run["total_seconds"] >= run["construction_seconds"] > 0 for run in runs.values())
    assert set(results["bar"]) == {
        "cached_vs_uncached",
        "cached_vs_dpo_lora",
        "target_kl_sampled_within_20_percent",
        "sweep4_vs_single_head",
        "sweep4_uncached_vs_single_head_uncached",
    }
    ratio = runs["iav_cached"]["total_seconds"] / runs["iav"]["total_seconds"]
    assert results["bar"]["cached_vs_uncached"]["ratio"] == pytest.approx(ratio)
    sweep = runs["iav_sweep4_uncached"]["total_seconds"] / runs["iav"]["total_seconds"]
    assert results["bar"]["sweep4_uncached_vs_single_head_uncached"]["ratio"] == pytest.approx(sweep)
    assert runs["iav_target_kl"]["final_lambda_kl"] != DEFAULT_LAMBDA_KL  # the controller moved it
    kl = results["target_kl"]
    assert kl["sampled"]["stepwise_kl_per_token"] > 0 and kl["teacher_forced_on_heldout_pairs"] > 0
    report = markdown(results)
    for variant in VARIANTS:
        assert f"| {variant} |" in report


def test_the_variants_to_run_are_checked_and_always_include_the_two_iav_runs():
    assert FeatureCacheConfig(variants=["iav_target_kl"]).variants == ["iav", "iav_cached", "iav_target_kl"]
    with pytest.raises(ValueError, match="Unknown variants"):
        FeatureCacheConfig(variants=["lora"])
