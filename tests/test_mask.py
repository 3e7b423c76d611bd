"""The automatic CT brain mask (``stm_dlp.perfusion.mask``): cortex next to the skull kept, robust to noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stm_dlp.perfusion.mask import (
    baseline_image,
    brain_mask,
    dilate,
    erode,
    fill_holes,
    label_components,
    largest_component,
    median_filter,
)


def _skull_head(size: int = 32, n_slices: int = 2, n_frames: int = 10, arrival: int = 4, noise_hu: float = 0.0,
                impulses: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A tiny head: air, a 1000 HU skull ring, a 2 px gray-matter ribbon (38 HU) touching its inner
    surface, white matter (28 HU), a ventricle (8 HU) and an artery; the bolus from ``arrival`` on.

    Returns ``(frames (S, T, H, W) HU, times (S, T), brain (S, H, W))``.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    r = np.hypot(y / 0.9, x)
    half = size / 2
    brain = r < half - 3.5
    skull = (r >= half - 3.5) & (r < half - 1.5)
    gm = brain & (r >= half - 5.5)
    vent = (np.abs(y) < 3) & (np.abs(x) < 1.6)
    base = np.full((size, size), -1000.0)
    base[skull] = 1000.0
    base[brain] = 28.0
    base[gm] = 38.0
    base[vent] = 8.0
    t = np.arange(n_frames, dtype=np.float64) * 1.5
    bolus = np.clip(np.arange(n_frames) - arrival + 1, 0, None).astype(np.float64)
    bolus = bolus**2 * np.exp(-bolus / 1.5)
    bolus /= bolus.max()
    frames = np.repeat(base[None, None], n_slices, 0).repeat(n_frames, 1)
    art = (slice(None), slice(None), int(half), int(half) + 4)
    frames[art] += 300.0 * bolus
    frames = frames + 25.0 * bolus[None, :, None, None] * (brain & ~vent)[None, None]
    if noise_hu > 0:
        frames = frames + rng.normal(0.0, noise_hu, frames.shape)
    if impulses > 0:
        hit = rng.uniform(size=frames.shape) < impulses
        frames[hit] += rng.choice([-1.0, 1.0], hit.sum()) * rng.uniform(300.0, 1000.0, hit.sum())
    times = np.repeat(t[None], n_slices, 0)
    return frames.astype(np.float32), times.astype(np.float32), np.repeat(brain[None], n_slices, 0)


def test_cortex_next_to_the_skull_is_kept():
    frames, times, brain = _skull_head()
    mask = brain_mask(frames, times)
    assert isinstance(mask, np.ndarray) and mask.dtype == bool and mask.shape == brain.shape
    assert mask[brain].mean() >= 0.99
    assert not mask[~brain].any()  # no skull, no air
    # the ribbon itself (the outermost brain ring) is what an eroded mask loses
    ring = brain & ~erode(torch.from_numpy(brain), 1).numpy()
    assert mask[ring].mean() >= 0.99
    # and the calculation approach uses this mask (it used to erode it: -1 px ring, ~20 % of this brain)
    from stm_dlp.perfusion.maps import calculate_maps

    maps, info = calculate_maps(frames, times, None, spatial_sigma_px=0.0)
    assert info["mask_source"] == "auto" and maps["mask"][brain].mean() >= 0.99


@pytest.mark.parametrize("noise_hu", [15.0, 30.0])
def test_noisy_study_keeps_the_brain(noise_hu):
    frames, times, brain = _skull_head(noise_hu=noise_hu, impulses=0.01, seed=int(noise_hu))
    mask = brain_mask(frames, times)
    assert mask[brain].mean() >= 0.95, mask[brain].mean()
    assert mask[~brain].mean() < 0.01


def test_short_prebolus_and_baseline_input():
    """A 2-frame pre-bolus phase (median of 2 = mean) and an (S, H, W) baseline given directly."""
    frames, times, brain = _skull_head(arrival=2, noise_hu=15.0, impulses=0.01, seed=5)
    assert brain_mask(frames, times)[brain].mean() >= 0.95
    base = baseline_image(torch.from_numpy(frames), 2)
    m = brain_mask(base)
    assert isinstance(m, torch.Tensor) and m.dtype == torch.bool
    assert m.numpy()[brain].mean() >= 0.95
    with pytest.raises(ValueError, match="S, T, H, W"):
        brain_mask(frames[0, 0])


def test_phantom_brain_is_whole():
    """The classic phantom's cortex touches its skull too: the mask keeps >= 99 % of its brain."""
    from stm_dlp.data.phantom import ARTERY, VEIN, PhantomConfig, simulate_patient

    st = simulate_patient(PhantomConfig(height=64, width=64, n_slices=2, noise_hu=3.0), seed=0)
    mask = brain_mask(st.frames, st.times_s)
    assert mask[st.mask].mean() >= 0.99
    extra = mask & ~st.mask
    assert np.isin(st.meta["labels"][extra], [ARTERY, VEIN]).all()  # only the vessels the truth leaves out


def _bfs_count(m: np.ndarray) -> int:
    seen = np.zeros_like(m)
    n = 0
    for i, j in zip(*np.nonzero(m)):
        if seen[i, j]:
            continue
        n += 1
        stack = [(i, j)]
        seen[i, j] = True
        while stack:
            a, b = stack.pop()
            for da, db in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                u, v = a + da, b + db
                if 0 <= u < m.shape[0] and 0 <= v < m.shape[1] and m[u, v] and not seen[u, v]:
                    seen[u, v] = True
                    stack.append((u, v))
    return n


def test_binary_helpers():
    rng = np.random.default_rng(1)
    m = rng.uniform(size=(3, 14, 17)) < 0.55
    lab = label_components(torch.from_numpy(m)).numpy()
    for s in range(3):
        assert len(np.unique(lab[s][m[s]])) == _bfs_count(m[s])
        assert (lab[s][~m[s]] == 0).all()
    big = largest_component(torch.from_numpy(m)).numpy()
    for s in range(3):
        sizes = np.bincount(lab[s][m[s]])
        assert big[s].sum() == sizes.max() and len(np.unique(lab[s][big[s]])) == 1
    ring = np.zeros((1, 9, 9), bool)
    ring[0, 2:7, 2:7] = True
    ring[0, 3:6, 3:6] = False
    ring[0, 4, 4] = True  # an island inside the hole
    filled = fill_holes(torch.from_numpy(ring)).numpy()
    assert filled[0, 2:7, 2:7].all() and filled.sum() == 25
    open_ring = ring.copy()
    open_ring[0, 4, 2] = False  # a gap: the inside is no longer a hole
    assert fill_holes(torch.from_numpy(open_ring)).numpy().sum() == open_ring.sum()
    img = torch.from_numpy(rng.normal(size=(2, 8, 9)))
    med = median_filter(img, 1).numpy()
    pad = np.pad(img.numpy(), ((0, 0), (1, 1), (1, 1)), mode="edge")
    ref = np.median(np.stack([pad[:, i:i + 8, j:j + 9] for i in range(3) for j in range(3)]), 0)
    np.testing.assert_allclose(med, ref)
    dot = torch.zeros(1, 7, 7, dtype=torch.bool)
    dot[0, 3, 3] = True
    assert int(dilate(dot, 1).sum()) == 9 and torch.equal(erode(dilate(dot, 1), 1), dot)


# ---------------------------------------------------------------------------------------------- CSF
@pytest.mark.parametrize("noise_hu", [0.0, 8.0])
def test_slice_csf_finds_the_ventricle_and_nothing_else(noise_hu):
    """The one CSF test (shared by the calc and the model's maps): the 8 HU ventricle is CSF, the 28-38 HU
    parenchyma next to it is not — also with 8 HU noise per frame."""
    from stm_dlp.perfusion.mask import slice_csf

    frames, times, brain = _skull_head(size=48, n_frames=14, noise_hu=noise_hu, seed=1)
    size = frames.shape[-1]
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    vent = (np.abs(y) < 3) & (np.abs(x) < 1.6)
    fr, tt = torch.from_numpy(frames), torch.from_numpy(times)
    lengths = torch.full((fr.shape[0],), fr.shape[1])
    csf = slice_csf(fr, tt, lengths, torch.from_numpy(brain)).numpy()
    core = vent & (np.abs(y) < 2) & (np.abs(x) < 1)
    assert csf[:, core].all()
    far = brain[0] & (np.hypot(y, x) > 6)
    assert not csf[:, far].any()
    assert csf.sum() <= 2 * vent.sum() * frames.shape[0]


def test_slice_csf_leaves_non_hu_data_alone():
    """Frames that are not head-CT HU (e.g. normalised to 0-1) have 'CSF' everywhere: nothing is excluded
    rather than the whole brain; padding frames past ``lengths`` are ignored."""
    from stm_dlp.perfusion.mask import slice_csf

    frames, times, brain = _skull_head()
    fr = torch.from_numpy(frames / 1000.0)
    lengths = torch.tensor([frames.shape[1], 3])
    assert not slice_csf(fr, torch.from_numpy(times), lengths, torch.from_numpy(brain)).any()
