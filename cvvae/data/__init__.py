"""Training, evaluation and dataset-encoding data: item sources, clip sampling, datasets and loaders.

Quick start::

    from cvvae.data import ClipDataset, ClipSpec, MixedLoader, list_items

    videos = ClipDataset(list_items("clips/", kind="video"), ClipSpec(frames=17, stride=(1, 8)), seed=0)
    images = ClipDataset(list_items("images/", kind="image"), ClipSpec(frames=1), seed=0)
    loader = MixedLoader({"images": images, "videos": videos}, {"images": 0.5, "videos": 0.5},
                         batch_size={"images": 8, "videos": 1}, num_workers=4, seed=58)
    for batch in loader:  # batch["video"]: (B, 3, T, H, W) in [-1, 1]; batch["source"]: "images"/"videos"
        ...
"""

from cvvae.data.clips import (
    REASONS,
    ClipDataset,
    ClipError,
    ClipSpec,
    MixedLoader,
    ShardClipDataset,
    collate,
    read_clip,
    sample_window,
)
from cvvae.data.latents import LatentDataset, encode_dataset
from cvvae.data.sources import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    ShardSample,
    expand_shards,
    is_image_item,
    iter_shard_samples,
    list_items,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "REASONS",
    "VIDEO_EXTENSIONS",
    "ClipDataset",
    "ClipError",
    "ClipSpec",
    "LatentDataset",
    "MixedLoader",
    "ShardClipDataset",
    "ShardSample",
    "collate",
    "encode_dataset",
    "expand_shards",
    "is_image_item",
    "iter_shard_samples",
    "list_items",
    "read_clip",
    "sample_window",
]
