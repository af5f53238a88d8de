"""Parts shared by the anomaly models: feature extractors, statistics, search, sampling, blur."""

from oddeye.models.components.blur import GaussianBlur2d, gaussian_kernel1d
from oddeye.models.components.buffers import DynamicBufferMixin
from oddeye.models.components.feature_cache import FrozenFeatureCache, batch_fingerprint
from oddeye.models.components.feature_extractor import TimmFeatureExtractor, WeightsUnavailableError, read_state_dict
from oddeye.models.components.fx_feature_extractor import TorchFXFeatureExtractor
from oddeye.models.components.gmm import GaussianMixture
from oddeye.models.components.head_groups import HeadGroups
from oddeye.models.components.k_center_greedy import KCenterGreedy
from oddeye.models.components.kde import FeatureScalingMethod, GaussianKDE, KDEClassifier
from oddeye.models.components.kmeans import KMeans
from oddeye.models.components.multivariate_gaussian import (
    GaussianAccumulator,
    MultiVariateGaussian,
    mahalanobis,
    mahalanobis_heads,
)
from oddeye.models.components.nearest_neighbors import MemoryBank, knn, knn_heads, squared_distances
from oddeye.models.components.pca import PCA
from oddeye.models.components.random_projection import SparseRandomProjection, johnson_lindenstrauss_min_dim
from oddeye.models.components.vit_features import ViTFeatureExtractor

__all__ = [
    "PCA",
    "DynamicBufferMixin",
    "FeatureScalingMethod",
    "FrozenFeatureCache",
    "GaussianAccumulator",
    "GaussianBlur2d",
    "GaussianKDE",
    "GaussianMixture",
    "HeadGroups",
    "KCenterGreedy",
    "KDEClassifier",
    "KMeans",
    "MemoryBank",
    "MultiVariateGaussian",
    "SparseRandomProjection",
    "TimmFeatureExtractor",
    "TorchFXFeatureExtractor",
    "ViTFeatureExtractor",
    "WeightsUnavailableError",
    "batch_fingerprint",
    "gaussian_kernel1d",
    "johnson_lindenstrauss_min_dim",
    "knn",
    "knn_heads",
    "mahalanobis",
    "mahalanobis_heads",
    "read_state_dict",
    "squared_distances",
]
