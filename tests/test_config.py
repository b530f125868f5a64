import pytest
import torch

from esam.config import (ESAMLossConfig, config_from_dict, config_to_dict, esam_preset,
                         load_config, preset, seed_preset)
from esam.losses import ESAMCriterion, HungarianMatcher, SparseMatcher
from esam.losses.instance import MixedInstanceCriterion


def test_presets_differ_only_in_named_options():
    seed, esam = config_to_dict(seed_preset()), config_to_dict(esam_preset())
    differing = {k for k in seed if seed[k] != esam[k]}
    assert differing <= {"matcher", "normalization", "dice_form", "no_object_weight",
                         "score_iou_threshold", "box_loss", "fix_dice_loss_weight",
                         "fix_mean_loss", "final_dice_sum", "merge"}
    assert seed["loss_weight"] == esam["loss_weight"]


def test_criterion_built_from_each_preset():
    seed = ESAMCriterion("seed")
    esam = ESAMCriterion("esam")
    assert isinstance(seed.instance.matcher, HungarianMatcher)
    assert isinstance(esam.instance.matcher, SparseMatcher)
    assert isinstance(esam.instance, MixedInstanceCriterion)
    assert esam.instance.class_weight[-1].item() == pytest.approx(0.1)


def test_dict_on_top_of_a_preset():
    cfg = config_from_dict({"preset": "esam", "num_semantic_classes": 20,
                            "loss_weight": {"sem": 2}, "matcher": {"costs": {"cls": 1.0}}})
    assert cfg.num_semantic_classes == 20
    assert cfg.loss_weight.sem == 2.0 and cfg.loss_weight.cls == 0.5
    assert cfg.matcher.type == "sparse" and cfg.matcher.costs == {"cls": 1.0}


def test_yaml_round_trip(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text("preset: seed\nloss_weight:\n  dice: 3\nnormalization: matched\n")
    cfg = load_config(p)
    assert cfg.loss_weight.dice == 3.0 and cfg.normalization == "matched"
    crit = ESAMCriterion(str(p))
    assert crit.config == cfg


def test_unknown_keys_suggest_the_closest():
    with pytest.raises(ValueError, match=r"loss_wieght.*did you mean 'loss_weight'"):
        config_from_dict({"loss_wieght": {}})
    with pytest.raises(ValueError, match=r"loss_weight.dcie.*did you mean 'dice'"):
        config_from_dict({"loss_weight": {"dcie": 1.0}})
    with pytest.raises(ValueError, match=r"normalization.*did you mean 'matched'"):
        ESAMLossConfig(normalization="matchd")
    with pytest.raises(ValueError, match="preset"):
        preset("esm")
    with pytest.raises(ValueError, match=r"costs.bec"):
        config_from_dict({"matcher": {"costs": {"bec": 1.0}}})


def test_invalid_values_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="loss_weight.sem"):
        config_from_dict({"loss_weight": {"sem": -1}})
    with pytest.raises(ValueError, match="topk"):
        config_from_dict({"matcher": {"topk": 0}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss_weight: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(bad)


def test_disabled_terms_are_absent():
    from test_instance import make_batch

    preds, targets = make_batch([(6, 3, 20)], seed=1, c=1)
    cfg = seed_preset(4, 1)
    cfg.loss_weight.score = 0.0
    cfg.loss_weight.sem = 0.0
    out = ESAMCriterion(cfg)(preds, targets)
    assert "loss_score" not in out and "loss_sem" not in out and "loss_clip" not in out
    assert "loss_bbox" in out


def test_clip_term_present_with_its_inputs():
    from esam.structures import FramePrediction
    from test_instance import make_batch

    preds, targets = make_batch([(6, 3, 20), (5, 2, 10)], seed=2, c=1)
    preds = [FramePrediction(p.layers, fused_global=torch.randn(4, 8),
                             clip_global=torch.randn(4, 8)) for p in preds]
    cfg = seed_preset(4, 1)
    cfg.loss_weight.sem = 0.0
    out = ESAMCriterion(cfg)(preds, targets)
    assert torch.isfinite(out["loss_clip"])


@pytest.mark.parametrize("data,field", [
    ({"loss_weight": 3}, "loss_weight"),
    ({"num_semantic_classes": "20"}, "num_semantic_classes"),
    ({"num_semantic_classes": 2.5}, "num_semantic_classes"),
    ({"iter_matcher": "yes"}, "iter_matcher"),
    ({"cross_frame": {"iou_threshold": 2}}, "cross_frame.iou_threshold"),
    ({"ignore_index": "x"}, "ignore_index"),
    ({"loss_weight": {"sem": float("nan")}}, "loss_weight.sem"),
    ({"matcher": {"costs": {"cls": float("inf")}}}, "matcher.costs.cls"),
    ({"cross_frame": {"pos_weight": 0}}, "cross_frame.pos_weight"),
])
def test_wrong_types_and_ranges_name_the_field(data, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        config_from_dict(data)
