"""The long-video engine: any length and size, streaming equals in memory, official chunking
equals a straightforward reference, precision handling."""

import gc
import warnings

import pytest
import torch
import torch.nn.functional as F

from cvvae import InputError, codec
from cvvae.model.chunking import decode_overlap, encode_overlap

from .conftest import rel_err, tiny_model, video


def reference_official(model, x, fn, step):
    """The released temporal chunking, written as plainly as possible: round n runs frames
    [n*step, n*step + step + 1); rounds after the first drop their first output frame."""
    T = x.shape[2]
    rounds = max(1, -(-(T - 1) // step))
    outs = [fn(x[:, :, n * step : n * step + step + 1]) for n in range(rounds)]
    return torch.cat([outs[0]] + [o[:, :, 1:] for o in outs[1:]], dim=2)


@torch.no_grad()
@pytest.mark.parametrize("T", [1, 9, 17, 21, 41])
def test_official_mode_equals_reference(T):
    model = tiny_model(en_de_n_frames_a_time=8)  # 8-frame rounds: several rounds on tiny clips
    x = video(1, 3, T, 16, 16)
    ref_moments = reference_official(model, x, model.encoder, 8)
    torch.testing.assert_close(model.encode(x).latent_dist.mean, ref_moments[:, :4], rtol=0, atol=0)
    z = ref_moments[:, :4]
    torch.testing.assert_close(model.decode(z).sample, reference_official(model, z, model.decoder, 2), rtol=0, atol=0)
    assert codec.decode(model, codec.encode(model, x)).shape == x.shape


@torch.no_grad()
def test_full_mode_is_one_forward():
    model = tiny_model(en_de_n_frames_a_time=8)
    model.chunk_mode = "full"
    x = video(1, 3, 21, 16, 16)
    torch.testing.assert_close(codec.encode(model, x).mean, model.encoder(x)[:, :4], rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("piece", [1, 3, 8])
def test_streaming_equals_in_memory(piece):
    model = tiny_model(en_de_n_frames_a_time=8)
    x = video(1, 3, 21, 16, 16)
    whole = codec.encode(model, x)
    stream = codec.StreamEncoder(model, x.split(piece, dim=2))
    moments = torch.cat(list(stream), dim=2)
    assert stream.num_frames == 21 and (stream.height, stream.width) == (16, 16)
    torch.testing.assert_close(moments[:, :4], whole.mean, rtol=1e-6, atol=1e-6)
    frames = list(codec.decode_stream(model, whole))
    assert len(frames) == 3 and [f.shape[2] for f in frames] == [9, 8, 4]  # 8-frame rounds, one per window
    torch.testing.assert_close(torch.cat(frames, 2), model.decode(whole.mean).sample, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_single_frames_stream_as_4d():
    model = tiny_model()
    x = video(1, 3, 5, 16, 16)
    streamed = codec.encode(model, (x[:, :, i] for i in range(5)))
    torch.testing.assert_close(streamed.mean, codec.encode(model, x).mean, rtol=1e-6, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("T", [2, 7, 16])
def test_any_frame_count_pads_and_trims(T):
    model = tiny_model()
    x = video(1, 3, T, 16, 16)
    with pytest.warns(UserWarning, match="not 1 \\+ 4k"):
        lat = codec.encode(model, x)
    padded = torch.cat([x] + [x[:, :, -1:]] * (lat.mean.shape[2] * 4 - 3 - T), dim=2)
    assert (padded.shape[2] - 1) % 4 == 0
    torch.testing.assert_close(lat.mean, model.encode(padded).latent_dist.mean, rtol=0, atol=0)
    assert lat.num_frames == T
    out = codec.decode(model, lat)
    assert out.shape == x.shape
    torch.testing.assert_close(out, model.decode(lat.mean).sample[:, :, :T], rtol=0, atol=0)


@torch.no_grad()
def test_any_size_pads_and_crops():
    model = tiny_model()
    x = video(1, 3, 5, 30, 21)
    lat = codec.encode(model, x)
    assert lat.mean.shape[-2:] == (4, 3) and (lat.height, lat.width) == (30, 21)
    padded = F.pad(x, (0, 3, 0, 2, 0, 0), mode="replicate")
    torch.testing.assert_close(lat.mean, model.encode(padded).latent_dist.mean, rtol=0, atol=0)
    assert codec.decode(model, lat).shape == x.shape


@torch.no_grad()
def test_bf16_tracks_fp32():
    model = tiny_model()
    x = video(1, 3, 5, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-native-bf16 warning on AVX2 machines
        ref = codec.decode(model, codec.encode(model, x))
        low = codec.decode(model, codec.encode(model, x, dtype="bf16"), dtype="bf16")
    assert low.dtype == torch.float32
    assert rel_err(low, ref) < 0.05


def test_non_finite_rounds_are_recomputed_in_fp32():
    model = tiny_model()

    def fragile(x):  # overflows whenever autocast is on
        return x * float("inf") if torch.is_autocast_enabled("cpu") else x * 2

    run = codec._precise(model, fragile, torch.bfloat16)
    with pytest.warns(UserWarning, match="recomputed in float32"):
        y = run(torch.ones(1, 3, 1, 2, 2))
    torch.testing.assert_close(y, torch.full((1, 3, 1, 2, 2), 2.0))


def test_dtype_resolution():
    assert codec.resolve_dtype("fp32") == torch.float32
    assert codec.resolve_dtype("auto") == (torch.bfloat16 if codec.native_bf16() else torch.float32)
    with pytest.raises(InputError, match="fp16 is not supported on CPU"):
        codec.resolve_dtype("fp16")
    with pytest.raises(InputError, match="unknown dtype"):
        codec.resolve_dtype("int8")


def test_bad_stream_inputs():
    model = tiny_model()
    with pytest.raises(InputError, match="no frames"):
        codec.encode(model, iter([]))
    with pytest.raises(InputError, match="size changed"):
        codec.encode(model, [video(1, 3, 1, 16, 16), video(1, 3, 1, 16, 8)])
    with pytest.raises(InputError, match="another model"):
        codec.decode(model, torch.zeros(1, 16, 2, 2, 2))


def _frame_bytes() -> int:
    """Bytes of the distinct storages behind live (B, 3, T, H, W) tensors: frames, not weights or latents."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in gc.get_objects()
                if type(t) is torch.Tensor and t.ndim == 5 and t.shape[1] == 3}
    return sum(storages.values())


@torch.no_grad()
@pytest.mark.parametrize("mode", ["official", "blend"])
@pytest.mark.parametrize("piece", [4, 7, 16])
def test_streams_hold_one_round_of_frames(mode, piece):
    """While the model runs on a round, the streams hold only the frames that round and the next one need:
    not the pieces a window was gathered from, nor a round's output the caller has dropped (docs/benchmarks.md,
    "In length at 720p")."""
    model = tiny_model(en_de_n_frames_a_time=16)  # windows of 17 frames
    model.chunk_mode = mode
    frame, step = 3 * 16 * 16 * 4, 16
    shared_in, shared_out = encode_overlap(model)[0], decode_overlap(model)[1]  # 4 and 4 when blended
    seen = {"encode": [], "decode": []}

    def spy(fn, phase):
        def run(x):
            seen[phase].append((_frame_bytes() - before) // frame)
            return fn(x)
        return run

    gc.collect()
    before = _frame_bytes()  # frames that other tests' fixtures keep
    model.encode_clip, model.decode_clip = spy(model.encode_clip, "encode"), spy(model.decode_clip, "decode")
    sizes = [piece] * (60 // piece) + [60 % piece + 1]  # 61 frames: four rounds
    latents = codec.encode(model, (video(1, 3, n, 16, 16) for n in sizes))
    # the window, the frames the next window shares with it, one piece
    assert len(seen["encode"]) > 3 and max(seen["encode"]) <= (step + 1) + shared_in + piece
    lengths = []
    for out in codec.decode_stream(model, latents):
        lengths.append(out.shape[2])
        del out
    assert sum(lengths) == 61 and len(seen["decode"]) > 3
    assert max(seen["decode"]) <= (shared_out + 1 if shared_out else 0)  # the blended tail waiting for the next round
