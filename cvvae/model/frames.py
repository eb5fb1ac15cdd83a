"""Frame arithmetic of a causal video VAE with temporal factor `t` (4 for CV-VAE).

The encoder maps T = 1 + t*k frames to 1 + k latents: latent 0 sees frame 0 only, latent j >= 1
stands for frames t*j - t + 1 .. t*j. The decoder maps 1 + k latents back to 1 + t*k frames.
Worked examples with t = 4: 17 frames <-> 5 latents, 1 frame <-> 1 latent, 97 frames <-> 25 latents.
"""


def latent_frames(num_frames: int, t: int) -> int:
    """Latent frames produced from `num_frames` frames (17 -> 5 for t=4; 16 -> 4, ragged)."""
    if num_frames < 1:
        raise ValueError(f"need at least one frame, got {num_frames}")
    return 1 + (num_frames - 1) // t


def sample_frames(num_latents: int, t: int) -> int:
    """Video frames decoded from `num_latents` latent frames (5 -> 17 for t=4)."""
    if num_latents < 1:
        raise ValueError(f"need at least one latent frame, got {num_latents}")
    return 1 + (num_latents - 1) * t


def padded_frames(num_frames: int, t: int) -> int:
    """Smallest 1 + t*k that is >= `num_frames` (16 -> 17, 17 -> 17, 18 -> 21 for t=4)."""
    if num_frames < 1:
        raise ValueError(f"need at least one frame, got {num_frames}")
    return 1 + t * -(-(num_frames - 1) // t)  # ceil division
