"""Files in and out: video and image files (`video`), latent files (`latents`), atomic writes (`files`).

The names of `cvvae.io.video` are re-exported here (`from cvvae.io import read_frames`).
"""

from cvvae.io import video
from cvvae.io.video import (  # noqa: F401 - re-exports
    IMAGE_SUFFIXES,
    VideoInfo,
    VideoWriter,
    is_image_path,
    probe,
    read_frames,
    read_video,
    to_frames,
    to_tensor,
)

__all__ = list(video.__all__)
