"""Synthetic faces: deterministic, varied, fast, and laid out like aligned CelebA-HQ."""

from __future__ import annotations

import time

import numpy as np

from hybridgan.data.synthetic import synthetic_face


def test_deterministic_rgb_256():
    a, b = synthetic_face(7), synthetic_face(7)
    assert a.mode == "RGB" and a.size == (256, 256)
    assert a.tobytes() == b.tobytes()
    assert synthetic_face(8).tobytes() != a.tobytes()
    assert synthetic_face(7, seed=1).tobytes() != a.tobytes()
    assert synthetic_face(7, size=64).size == (64, 64)


def test_faces_vary_in_colour_and_layout():
    faces = np.stack([np.asarray(synthetic_face(i), dtype=np.float32) for i in range(24)])
    centre_means = faces[:, 96:160, 96:160].mean(axis=(1, 2))  # skin tone around the nose
    assert centre_means.std(axis=0).min() > 10
    assert faces.std(axis=0).mean() > 20  # pose, hair and background differ per face


def test_eyes_fall_in_the_central_hole():
    """The central 128x128 of the 256 frame (the 64x64 hole at 128) holds the eyes: in the eye band
    of the inner face, pupils and brows are far darker than the skin around them, on every face."""
    for i in range(16):
        grey = np.asarray(synthetic_face(i).convert("L"), dtype=np.float32)
        eyes = grey[96:132, 80:176]
        assert eyes.min() < 0.5 * np.median(eyes)
        # Below the eyes, beside the nose, is plain skin: no such dark feature.
        cheek = grey[140:150, 84:100]
        assert cheek.min() > 0.6 * np.median(cheek)


def test_fast_enough_for_packing():
    synthetic_face(0)
    start = time.perf_counter()
    for i in range(40):
        synthetic_face(i)
    per_image = (time.perf_counter() - start) / 40
    assert per_image < 0.03  # about 5 ms on an idle core; generous for a busy CI machine
