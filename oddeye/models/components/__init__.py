"""Parts shared by the anomaly models: feature extractors, Gaussians, blur."""

from oddeye.models.components.blur import GaussianBlur2d, gaussian_kernel1d
from oddeye.models.components.feature_extractor import TimmFeatureExtractor, WeightsUnavailableError, read_state_dict
from oddeye.models.components.multivariate_gaussian import GaussianAccumulator, MultiVariateGaussian, mahalanobis

__all__ = [
    "GaussianAccumulator",
    "GaussianBlur2d",
    "MultiVariateGaussian",
    "TimmFeatureExtractor",
    "WeightsUnavailableError",
    "gaussian_kernel1d",
    "mahalanobis",
    "read_state_dict",
]
