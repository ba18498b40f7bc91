"""Can the heatmap be trusted? Faithfulness, sanity checks and agreement with annotations.

- :func:`deletion_insertion`: the target's probability as the hottest pixels are removed or
  revealed step by step (Petsiuk et al. 2018), curves and areas under them;
- :func:`road`: ROAD (Rong et al. 2022), most / least relevant first with noisy linear
  imputation, as pytorch-grad-cam computes it;
- :func:`average_drop_increase`: average drop and increase in confidence (Grad-CAM++ paper);
- :func:`sanity_check`: cascading model-parameter randomisation (Adebayo et al. 2018), the maps
  of every stage and their Spearman correlation and SSIM with the original;
- :func:`agreement`: pointing game, energy-based pointing game, IoU and Dice of heatmaps and
  regions with a reader's annotations (mask, regions, GeoJSON or COCO).

The model-based metrics take images as :func:`napari_gradcam.explain` does and preprocess them
the same way; they perturb the model's *input* (after intensity scaling, mean / std and any
resize to a fixed input size), with the heatmaps resized to the input size. Scores are the
model's probabilities (softmax or sigmoid, as :func:`napari_gradcam.job.probabilities`), logits
kept beside them. Each has an ``iter_`` variant: a generator that yields a
:class:`~napari_gradcam.Progress` after every batch (close it to stop at the next one) and
returns the result. Results are small dataclasses of NumPy arrays shaped by the images' leading
axes, with ``rows()`` (one dict per image, for a CSV), ``summary()`` (means) and ``as_dict()``;
no table holds NaN.
"""

from ._agreement import Agreement, agreement, annotation_masks
from ._perturbation import (
    AverageDrop,
    DeletionInsertion,
    auc,
    average_drop_increase,
    deletion_insertion,
    iter_average_drop_increase,
    iter_deletion_insertion,
)
from ._road import Road, impute, iter_road, road
from ._sanity import SanityCheck, iter_sanity_check, sanity_check, spearman, ssim

__all__ = [
    "Agreement",
    "AverageDrop",
    "DeletionInsertion",
    "Road",
    "SanityCheck",
    "agreement",
    "annotation_masks",
    "auc",
    "average_drop_increase",
    "deletion_insertion",
    "impute",
    "iter_average_drop_increase",
    "iter_deletion_insertion",
    "iter_road",
    "iter_sanity_check",
    "road",
    "sanity_check",
    "spearman",
    "ssim",
]
