"""Training, evaluation and dataset-encoding data: item sources, clip sampling, datasets and loaders.

Modules: `sources` (folders, manifests, tar shards -> items), `clips` (items -> clips, datasets, the mixed
loader), `plan` (which clip each job of a dataset encoding is), `encode` (a dataset -> latent shards, many
processes), `shards` (the latent shard format), `latents` (latent shards -> a DataLoader), `split` (the sample
media's train/held-out split).

Quick start::

    from cvvae.data import ClipDataset, ClipSpec, MixedLoader, list_items

    videos = ClipDataset(list_items("clips/", kind="video"), ClipSpec(frames=17, stride=(1, 8)), seed=0)
    images = ClipDataset(list_items("images/", kind="image"), ClipSpec(frames=1), seed=0)
    loader = MixedLoader({"images": images, "videos": videos}, {"images": 0.5, "videos": 0.5},
                         batch_size={"images": 8, "videos": 1}, num_workers=4, seed=58)
    for batch in loader:  # batch["video"]: (B, 3, T, H, W) in [-1, 1]; batch["source"]: "images"/"videos"
        ...
"""

from cvvae.data import clips, sources
from cvvae.data.clips import (  # noqa: F401 - re-exports
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
from cvvae.data.encode import encode_dataset
from cvvae.data.latents import LatentDataset, collate_latents
from cvvae.data.plan import parse_buckets
from cvvae.data.sources import (  # noqa: F401 - re-exports
    IMAGE_EXTENSIONS,
    MEDIA_EXTENSIONS,
    VIDEO_EXTENSIONS,
    ShardSample,
    expand_shards,
    is_image_item,
    is_shards,
    iter_shard_samples,
    list_items,
    list_source,
    read_members,
    tar_items,
)

__all__ = [*clips.__all__, *sources.__all__, "LatentDataset", "collate_latents", "encode_dataset", "parse_buckets"]
