"""Video and image files in and out: streaming PyAV readers, an atomic writer, tensor conversion."""

from cvvae.io.video import (
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

__all__ = [
    "IMAGE_SUFFIXES",
    "VideoInfo",
    "VideoWriter",
    "is_image_path",
    "probe",
    "read_frames",
    "read_video",
    "to_frames",
    "to_tensor",
]
