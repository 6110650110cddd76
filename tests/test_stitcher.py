"""Tests of the streaming patch stitcher against brute-force full-volume references written here."""

import math
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import unet3d_lightning.prediction.stitcher as stitcher_module
from unet3d_lightning.prediction.stitcher import StreamingStitcher, gaussian_importance_map

# ----------------------------------------------------------------------------------------------------------------------
# Independent helpers: grid construction, halo rule, reference blending.
# ----------------------------------------------------------------------------------------------------------------------


def axis_starts(size, patch, stride):
    """Starts 0, s, 2s, ... with the last snapped to size - patch; one start and padded size = patch if too small."""
    if size <= patch:
        return [0], patch
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts, size


def make_grid(volume_shape, patch_shape, stride_shape):
    per_axis = [axis_starts(v, p, s) for v, p, s in zip(volume_shape, patch_shape, stride_shape)]
    padded = tuple(size for _, size in per_axis)
    grid = [
        (slice(z, z + patch_shape[0]), slice(y, y + patch_shape[1]), slice(x, x + patch_shape[2]))
        for z in per_axis[0][0]
        for y in per_axis[1][0]
        for x in per_axis[2][0]
    ]
    return grid, padded


def reference_gaussian(patch_shape, sigma_scale=1 / 8):
    """Non-separable evaluation on a meshgrid: exp(-sum_a (i_a - c_a)^2 / (2 sigma_a^2)), normalised to max 1."""
    axes = [torch.arange(p, dtype=torch.float64) for p in patch_shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    exponent = torch.zeros(patch_shape, dtype=torch.float64)
    for coords, p in zip(mesh, patch_shape):
        exponent += (coords - (p - 1) / 2) ** 2 / (2 * (sigma_scale * p) ** 2)
    g = torch.exp(-exponent)
    return g / g.max()


def reference_stitch(predictions, grid, padded, volume_shape, halo, blend):
    """Brute force: full-volume float64 sum and weight accumulators, halo cropped on interior faces only."""
    channels = predictions.shape[1]
    patch_shape = tuple(predictions.shape[2:])
    weight_map = (
        reference_gaussian(patch_shape) if blend == "gaussian" else torch.ones(patch_shape, dtype=torch.float64)
    )
    total = torch.zeros((channels, *padded), dtype=torch.float64)
    weight = torch.zeros(padded, dtype=torch.float64)
    for prediction, location in zip(predictions, grid):
        kept, local = [], []
        for axis, sl in enumerate(location):
            lo = sl.start if sl.start == 0 else sl.start + halo[axis]
            hi = sl.stop if sl.stop == padded[axis] else sl.stop - halo[axis]
            kept.append(slice(lo, hi))
            local.append(slice(lo - sl.start, hi - sl.start))
        w = weight_map[tuple(local)]
        total[(slice(None), *kept)] += prediction.double()[(slice(None), *local)] * w
        weight[tuple(kept)] += w
    d, h, w_ = volume_shape
    return (total / weight)[:, :d, :h, :w_].float()


def starts_of(locations):
    return torch.tensor([[sl.start for sl in location] for location in locations], dtype=torch.int64)


def assemble(slabs, volume_shape, channels):
    """Check the slabs tile [0, D) in order with the right shapes, and concatenate them."""
    d, h, w = volume_shape
    expected_start = 0
    for z_start, z_stop, tensor in slabs:
        assert z_start == expected_start and z_stop > z_start
        assert tensor.shape == (channels, z_stop - z_start, h, w)
        assert tensor.dtype == torch.float32
        expected_start = z_stop
    assert expected_start == d
    return torch.cat([tensor for _, _, tensor in slabs], dim=1)


def stream(stitcher, predictions, grid, rng, max_batch, order=None):
    """Feed the patches (z-major) in random batch sizes; return (all slabs, rows returned before finish)."""
    order = list(range(len(grid))) if order is None else order
    slabs, i = [], 0
    while i < len(order):
        chunk = order[i : i + rng.randint(1, max_batch)]
        slabs += stitcher.add(predictions[chunk], starts_of([grid[k] for k in chunk]))
        i += len(chunk)
    streamed_rows = sum(stop - start for start, stop, _ in slabs)
    slabs += stitcher.finish()
    return slabs, streamed_rows


def random_config(rng, allow_small=True):
    """Random volume / patch / stride / halo with stride <= patch - 2*halo; some axes smaller than the patch."""
    volume, patch, stride, halo = [], [], [], []
    for _ in range(3):
        p = rng.randint(3, 8)
        h = rng.randint(0, (p - 1) // 2)
        s = rng.randint(1, p - 2 * h)
        v = rng.randint(1, p - 1) if allow_small and rng.random() < 0.2 else rng.randint(p, 3 * p + 2)
        volume.append(v)
        patch.append(p)
        stride.append(s)
        halo.append(h)
    return tuple(volume), tuple(patch), tuple(stride), tuple(halo)


# ----------------------------------------------------------------------------------------------------------------------
# Gaussian importance map
# ----------------------------------------------------------------------------------------------------------------------


def test_gaussian_map_matches_independent_formula():
    for shape in [(8, 8, 8), (5, 12, 7), (1, 4, 9), (16, 3, 2)]:
        g = gaussian_importance_map(shape)
        assert g.shape == shape and g.dtype == torch.float32
        torch.testing.assert_close(g.double(), reference_gaussian(shape), rtol=1e-6, atol=1e-12)
        assert g.max().item() == 1.0
        assert (g > 0).all()


def test_gaussian_map_hand_worked_values():
    # Patch (1, 1, 3): centre 1, sigma = 3/8, neighbours at distance 1: exp(-0.5 * (8/3)^2) = exp(-32/9).
    g = gaussian_importance_map((1, 1, 3))
    expected = torch.tensor([[[math.exp(-32 / 9), 1.0, math.exp(-32 / 9)]]])
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=0)
    assert abs(math.exp(-32 / 9) - 0.0285655) < 1e-6
    # Even size 4: centre 1.5, sigma 0.5, distances 0.5 and 1.5 -> exp(-0.5), exp(-4.5), normalised by exp(-0.5).
    g4 = gaussian_importance_map((1, 1, 4))[0, 0]
    torch.testing.assert_close(g4, torch.tensor([math.exp(-4.0), 1.0, 1.0, math.exp(-4.0)]), rtol=1e-6, atol=0)


def test_gaussian_map_has_no_zeros_even_when_underflowing():
    # sigma = 64/64 = 1: the corners are exp(-3 * 31.5^2 / 2) = 0 in float32, clamped to the smallest positive value.
    g = gaussian_importance_map((64, 64, 64), sigma_scale=1 / 64)
    unclamped = reference_gaussian((64, 64, 64), sigma_scale=1 / 64).float()
    assert (unclamped == 0).any()
    smallest_positive = unclamped[unclamped > 0].min()
    assert (g > 0).all()
    assert g.min() == smallest_positive
    positive = unclamped > 0
    assert torch.equal(g[positive], unclamped[positive])


def test_gaussian_map_is_cached():
    assert gaussian_importance_map((6, 7, 8)) is gaussian_importance_map([6, 7, 8])
    assert gaussian_importance_map((6, 7, 8), device="cpu") is gaussian_importance_map((6, 7, 8), device=None)


# ----------------------------------------------------------------------------------------------------------------------
# Correctness of the streaming stitch
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blend", ["average", "gaussian"])
def test_identity_model_reproduces_input(blend):
    rng = random.Random(1234 if blend == "average" else 4321)
    for trial in range(30):
        volume, patch, stride, halo = random_config(rng)
        channels = rng.randint(1, 3)
        grid, padded = make_grid(volume, patch, stride)
        torch.manual_seed(trial)
        image = torch.rand((channels, *volume))
        # The caller pads volumes smaller than the patch; zeros here, reflection works the same.
        padded_image = torch.zeros((channels, *padded))
        padded_image[:, : volume[0], : volume[1], : volume[2]] = image
        predictions = torch.stack([padded_image[(slice(None), *location)] for location in grid])
        stitcher = StreamingStitcher(volume, grid, channels, blend=blend, halo=halo)
        slabs, _ = stream(stitcher, predictions, grid, rng, max_batch=7)
        output = assemble(slabs, volume, channels)
        torch.testing.assert_close(output, image, atol=1e-6, rtol=0, msg=f"{volume=} {patch=} {stride=} {halo=}")


@pytest.mark.parametrize("blend", ["average", "gaussian"])
def test_matches_brute_force_reference_with_halo(blend):
    rng = random.Random(99 if blend == "average" else 100)
    for trial in range(25):
        volume, patch, stride, halo = random_config(rng)
        channels = rng.randint(1, 4)
        grid, padded = make_grid(volume, patch, stride)
        torch.manual_seed(1000 + trial)
        predictions = torch.randn((len(grid), channels, *patch))
        stitcher = StreamingStitcher(volume, grid, channels, blend=blend, halo=halo)
        slabs, _ = stream(stitcher, predictions, grid, rng, max_batch=9)
        expected = reference_stitch(predictions, grid, padded, volume, halo, blend)
        torch.testing.assert_close(assemble(slabs, volume, channels), expected, atol=1e-5, rtol=1e-5)


def test_hand_worked_one_dimensional_average_with_halo():
    # z: volume 6, patch 4, stride 2 -> starts 0, 2; halo 1 crops the interior faces: patch 0 keeps rows [0, 3),
    # patch 2 keeps rows [3, 6). No overlap is left, so each row is exactly its own patch's value.
    grid = [(slice(0, 4), slice(0, 1), slice(0, 1)), (slice(2, 6), slice(0, 1), slice(0, 1))]
    predictions = torch.tensor([[10.0, 11.0, 12.0, 13.0], [20.0, 21.0, 22.0, 23.0]]).reshape(2, 1, 4, 1, 1)
    stitcher = StreamingStitcher((6, 1, 1), grid, 1, halo=(1, 0, 0))
    first = stitcher.add(predictions[:1], [[0, 0, 0]])
    assert first == []  # nothing final until a patch with the next z-start arrives
    second = stitcher.add(predictions[1:], [[2, 0, 0]])
    assert [(a, b) for a, b, _ in second] == [(0, 3)]
    last = stitcher.finish()
    output = assemble(second + last, (6, 1, 1), 1).flatten()
    assert output.tolist() == [10.0, 11.0, 12.0, 21.0, 22.0, 23.0]
    # Without halo rows 2 and 3 are means of two patches: (12 + 20) / 2 and (13 + 21) / 2.
    stitcher = StreamingStitcher((6, 1, 1), grid, 1)
    slabs, _ = stream(stitcher, predictions, grid, random.Random(0), max_batch=2)
    assert assemble(slabs, (6, 1, 1), 1).flatten().tolist() == [10.0, 11.0, 16.0, 17.0, 22.0, 23.0]


def test_slabs_are_returned_while_streaming_and_memory_is_independent_of_depth():
    patch, stride, halo = (8, 6, 6), (4, 3, 3), (1, 1, 1)
    depths = {}
    for depth in (16, 64):
        volume = (depth, 10, 9)
        grid, padded = make_grid(volume, patch, stride)
        predictions = torch.rand((len(grid), 2, *patch))
        stitcher = StreamingStitcher(volume, grid, 2, blend="gaussian", halo=halo)
        slabs, streamed_rows = stream(stitcher, predictions, grid, random.Random(depth), max_batch=5)
        torch.testing.assert_close(
            assemble(slabs, volume, 2), reference_stitch(predictions, grid, padded, volume, halo, "gaussian")
        )
        assert stitcher.max_band_depth <= patch[0] + stride[0]
        # At most the rows of the last z-start remain for finish(); everything else was handed back by add().
        assert depth - streamed_rows <= patch[0]
        depths[depth] = stitcher.max_band_depth
    assert depths[64] == depths[16]


@pytest.mark.parametrize("blend", ["average", "gaussian"])
def test_bf16_predictions_accumulate_in_float32(blend):
    volume, patch, stride, halo = (20, 11, 13), (8, 8, 8), (4, 5, 4), (2, 1, 1)
    grid, padded = make_grid(volume, patch, stride)
    torch.manual_seed(7)
    full = torch.rand((len(grid), 3, *patch)) + 1.0
    bf16 = full.to(torch.bfloat16)
    stitcher = StreamingStitcher(volume, grid, 3, blend=blend, halo=halo)
    slabs, _ = stream(stitcher, bf16, grid, random.Random(3), max_batch=6)
    output = assemble(slabs, volume, 3)
    assert output.dtype == torch.float32
    # Exact in float32 on the bf16-rounded values: nothing was accumulated in bf16.
    torch.testing.assert_close(
        output, reference_stitch(bf16.float(), grid, padded, volume, halo, blend), atol=1e-5, rtol=1e-6
    )
    # And within bf16 rounding (8 bits of mantissa) of the full-precision result.
    torch.testing.assert_close(
        output, reference_stitch(full, grid, padded, volume, halo, blend), atol=0, rtol=2**-8
    )


def test_starts_as_list_and_batches_spanning_several_z_starts():
    volume, patch, stride = (30, 6, 6), (6, 6, 6), (2, 6, 6)
    grid, padded = make_grid(volume, patch, stride)
    predictions = torch.randn((len(grid), 1, *patch))
    stitcher = StreamingStitcher(volume, grid, 1, halo=(1, 0, 0))
    # One batch holding every patch: all but the last band become final inside that single add().
    slabs = stitcher.add(predictions, [[s.start for s in location] for location in grid])
    assert len(slabs) == len(grid) - 1
    slabs += stitcher.finish()
    expected = reference_stitch(predictions, grid, padded, volume, (1, 0, 0), "average")
    torch.testing.assert_close(assemble(slabs, volume, 1), expected)


# ----------------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------------


def test_out_of_order_z_starts_raise():
    volume, patch, stride = (12, 6, 6), (6, 6, 6), (3, 3, 3)
    grid, _ = make_grid(volume, patch, stride)
    predictions = torch.rand((2, 1, *patch))
    stitcher = StreamingStitcher(volume, grid, 1)
    stitcher.add(predictions[:1], [[3, 0, 0]])
    with pytest.raises(RuntimeError, match="z-major order"):
        stitcher.add(predictions[:1], [[0, 0, 0]])
    # Out of order inside one batch is caught too, before anything is accumulated.
    stitcher = StreamingStitcher(volume, grid, 1)
    with pytest.raises(RuntimeError, match="z-major order"):
        stitcher.add(predictions, [[6, 0, 0], [3, 0, 0]])


def test_unknown_and_duplicate_starts_and_use_after_finish_raise():
    volume, patch, stride = (12, 6, 6), (6, 6, 6), (3, 3, 3)
    grid, _ = make_grid(volume, patch, stride)
    predictions = torch.rand((2, 1, *patch))
    stitcher = StreamingStitcher(volume, grid, 1)
    with pytest.raises(ValueError, match="not a start of the grid"):
        stitcher.add(predictions[:1], [[1, 0, 0]])
    with pytest.raises(RuntimeError, match="added twice"):
        stitcher.add(predictions, [[0, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="shape"):
        stitcher.add(torch.rand((1, 2, *patch)), [[0, 0, 0]])
    with pytest.raises(RuntimeError, match="0 of the grid's"):
        stitcher.finish()  # without reduce every patch is required
    slabs, _ = stream(stitcher, torch.rand((len(grid), 1, *patch)), grid, random.Random(0), 4)
    with pytest.raises(RuntimeError, match="after finish"):
        stitcher.add(predictions[:1], [[0, 0, 0]])


def test_invalid_halo_and_coverage_raise_with_message():
    grid, _ = make_grid((20, 8, 8), (8, 8, 8), (4, 4, 4))
    with pytest.raises(ValueError, match=r"halo 4 along axis z must satisfy 0 <= halo < patch / 2 for patch 8"):
        StreamingStitcher((20, 8, 8), grid, 1, halo=(4, 0, 0))
    with pytest.raises(ValueError, match="halo -1"):
        StreamingStitcher((20, 8, 8), grid, 1, halo=-1)
    # stride 4 > patch 8 - 2*3: rows are lost between kept intervals.
    with pytest.raises(ValueError, match=r"axis z, patch 8 with stride 4 and halo 3 .*need stride <= patch - 2\*halo"):
        StreamingStitcher((20, 8, 8), grid, 1, halo=3)
    StreamingStitcher((20, 8, 8), grid, 1, halo=2)  # stride 4 == 8 - 2*2 is fine
    wide, _ = make_grid((8, 20, 8), (8, 8, 8), (8, 7, 8))
    with pytest.raises(ValueError, match="axis y, patch 8 with stride 7 and halo 1"):
        StreamingStitcher((8, 20, 8), wide, 1, halo=1)


def test_invalid_grid_and_arguments_raise():
    grid, _ = make_grid((20, 8, 8), (8, 8, 8), (4, 4, 4))
    with pytest.raises(ValueError, match="blend"):
        StreamingStitcher((20, 8, 8), grid, 1, blend="max")
    with pytest.raises(ValueError, match="along axis z"):
        StreamingStitcher((21, 8, 8), grid, 1)
    with pytest.raises(ValueError, match="same shape"):
        StreamingStitcher((20, 8, 8), grid + [(slice(0, 9), slice(0, 8), slice(0, 8))], 1)
    holes, _ = make_grid((20, 8, 20), (8, 8, 8), (4, 4, 4))
    with pytest.raises(ValueError, match="product"):
        StreamingStitcher((20, 8, 20), holes[:2] + holes[3:], 1)
    with pytest.raises(ValueError, match="starts at 2"):
        StreamingStitcher((10, 8, 8), [(slice(2, 10), slice(0, 8), slice(0, 8))], 1)


def test_stitcher_imports_only_torch():
    src = Path(stitcher_module.__file__).resolve().parents[2]
    code = (
        "import sys, unet3d_lightning.prediction.stitcher; "
        "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'h5py') if m in sys.modules))"
    )
    env = dict(os.environ, PYTHONPATH=str(src))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------------------------------
# DDP contract, simulated with threads
# ----------------------------------------------------------------------------------------------------------------------


def run_simulated_ranks(world, volume, grid, predictions, *, blend, halo, seed, in_place):
    barrier = threading.Barrier(world, timeout=20)
    deposits = [None] * world
    shapes = [[] for _ in range(world)]
    results, errors = [None] * world, []

    def make_reduce(rank):
        def reduce(tensor):
            assert tensor.dtype == torch.float32 and tensor.is_contiguous()
            shapes[rank].append(tuple(tensor.shape))
            deposits[rank] = tensor.clone()
            barrier.wait()
            total = torch.stack(deposits).sum(dim=0)  # same order on every rank, as all_reduce guarantees
            barrier.wait()  # nobody deposits the next band before everyone has read this one
            if in_place:  # like torch.distributed.all_reduce, which overwrites its argument
                tensor.copy_(total)
                return tensor
            return total

        return reduce

    def worker(rank):
        try:
            stitcher = StreamingStitcher(
                volume, grid, predictions.shape[1], blend=blend, halo=halo, device="cpu", reduce=make_reduce(rank)
            )
            mine = list(range(rank, len(grid), world))  # Lightning's predict sampler: round-robin, no padding
            slabs, _ = stream(stitcher, predictions, grid, random.Random(seed + rank), max_batch=4, order=mine)
            results[rank] = assemble(slabs, volume, predictions.shape[1])
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(rank,), daemon=True) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a simulated rank deadlocked"
    if errors:
        raise errors[0]
    return results, shapes


@pytest.mark.parametrize(
    "world, volume, patch, stride, halo, blend",
    [
        (2, (22, 13, 12), (8, 8, 8), (4, 5, 4), (1, 1, 1), "gaussian"),
        (3, (22, 13, 12), (8, 8, 8), (4, 5, 4), (2, 0, 1), "average"),
        # nz = 5, one patch per z-start: each rank skips z-starts, and must still reduce every band.
        (3, (24, 6, 6), (8, 6, 6), (4, 6, 6), (1, 0, 0), "gaussian"),
        # Two patches over three ranks: rank 2 receives nothing and only calls finish().
        (3, (12, 7, 6), (8, 8, 6), (4, 4, 6), (0, 0, 0), "average"),
        # Volume shallower than the patch: bands beyond D are skipped identically on every rank.
        (2, (5, 9, 9), (8, 6, 6), (4, 3, 3), (1, 1, 1), "gaussian"),
    ],
)
@pytest.mark.parametrize("in_place", [True, False], ids=["in-place-reduce", "returning-reduce"])
def test_ddp_ranks_reduce_to_the_single_process_result(world, volume, patch, stride, halo, blend, in_place):
    grid, padded = make_grid(volume, patch, stride)
    torch.manual_seed(len(grid))
    predictions = torch.randn((len(grid), 2, *patch))
    results, shapes = run_simulated_ranks(
        world, volume, grid, predictions, blend=blend, halo=halo, seed=5, in_place=in_place
    )

    single = StreamingStitcher(volume, grid, 2, blend=blend, halo=halo)
    single_slabs, _ = stream(single, predictions, grid, random.Random(1), max_batch=3)
    expected = assemble(single_slabs, volume, 2)
    torch.testing.assert_close(expected, reference_stitch(predictions, grid, padded, volume, halo, blend))
    for rank in range(world):
        torch.testing.assert_close(results[rank], expected, atol=1e-5, rtol=1e-5)
        assert shapes[rank] == shapes[0]
    # One reduce per band: the bands tile [0, D), with (C + 1) channels over the padded y/x plane.
    assert sum(shape[0] for shape in shapes[0]) == volume[0]
    assert all(shape[1:] == (3, padded[1], padded[2]) for shape in shapes[0])
    if len(grid) < world:
        assert len(shapes[world - 1]) == len(shapes[0]) > 0


# ----------------------------------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_accumulates_on_device_in_float32_with_bounded_memory():
    device = torch.device("cuda")
    patch, stride, halo = (16, 16, 16), (8, 8, 8), (2, 2, 2)
    volume = (40, 30, 28)
    grid, padded = make_grid(volume, patch, stride)
    torch.manual_seed(0)
    predictions = torch.randn((len(grid), 2, *patch)).to(torch.bfloat16)
    stitcher = StreamingStitcher(volume, grid, 2, blend="gaussian", halo=halo)  # device from the predictions
    slabs, i = [], 0
    while i < len(grid):
        slabs += stitcher.add(predictions[i : i + 5].to(device), starts_of(grid[i : i + 5]))
        i += 5
    slabs += stitcher.finish()
    assert all(tensor.device.type == "cuda" and tensor.dtype == torch.float32 for _, _, tensor in slabs)
    output = assemble([(a, b, t.cpu()) for a, b, t in slabs], volume, 2)
    expected = reference_stitch(predictions.float(), grid, padded, volume, halo, "gaussian")
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)

    # Peak device memory while streaming does not grow with the volume's depth.
    peaks = {}
    for depth in (32, 128):
        grid, _ = make_grid((depth, 64, 64), patch, stride)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        stitcher = StreamingStitcher((depth, 64, 64), grid, 2, blend="gaussian", halo=halo, device=device)
        batch = torch.randn((8, 2, *patch), device=device, dtype=torch.bfloat16)
        for i in range(0, len(grid), 8):
            chunk = grid[i : i + 8]
            for _ in stitcher.add(batch[: len(chunk)], starts_of(chunk)):
                pass  # a writer would copy the slab out; dropping it frees it
        stitcher.finish()
        torch.cuda.synchronize()
        peaks[depth] = torch.cuda.max_memory_allocated() - base
    assert peaks[128] <= peaks[32] * 1.05 + 2**20
