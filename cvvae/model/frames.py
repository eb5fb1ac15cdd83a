"""Frame arithmetic of a causal video VAE with temporal factor `t` (4 for CV-VAE).

The encoder maps T = 1 + t*k frames to 1 + k latents: latent 0 sees frame 0 only, latent j >= 1
stands for frames t*j - t + 1 .. t*j. The decoder maps 1 + k latents back to 1 + t*k frames.
Worked examples with t = 4: 17 frames <-> 5 latents, 1 frame <-> 1 latent, 97 frames <-> 25 latents.
"""


def time_levels(num_levels: int) -> list[bool]:
    """Which encoder levels halve time: every other one, starting at level 0, never the last.

    The decoder's up.i (i >= 1) doubles time exactly when encoder level i-1 halves it; the temporal factor
    is 2 ** sum(time_levels(n)) (4 for the released four levels).
    """
    return [i % 2 == 0 and i < num_levels - 1 for i in range(num_levels)]


def latent_frames(num_frames: int, t: int) -> int:
    """Latent frames produced from `num_frames` frames (17 -> 5 for t=4; 16 -> 5: a clip that is not 1 + t*k
    frames is padded up to one, never cut)."""
    if num_frames < 1:
        raise ValueError(f"need at least one frame, got {num_frames}")
    return 1 + -(-(num_frames - 1) // t)


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


def padding_notice(num_frames: int, t: int) -> str | None:
    """The note a user gets when a clip of `num_frames` frames is padded to 1 + t*k (None when it is not)."""
    if num_frames < 1 or (num_frames - 1) % t == 0:
        return None
    return (f"{num_frames} frames is not 1 + {t}k: padded to {padded_frames(num_frames, t)} by repeating the last "
            f"frame")
