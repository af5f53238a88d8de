"""Datasets for fit and eval: MVTec AD, VisA and folder layouts, video clips, synthetic benchmarks."""

from oddeye.data.images import (
    DatasetError,
    ImageCategory,
    ImageSample,
    find_categories,
    load_images,
    load_masks,
    open_category,
)
from oddeye.data.video import Clip, VideoDataset, find_video_datasets, is_video_dataset, open_video_dataset

__all__ = [
    "Clip",
    "DatasetError",
    "ImageCategory",
    "ImageSample",
    "VideoDataset",
    "find_categories",
    "find_video_datasets",
    "is_video_dataset",
    "load_images",
    "load_masks",
    "open_category",
    "open_video_dataset",
]
