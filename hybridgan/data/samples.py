"""One sample as both loaders read it: the shard's (key, JPEG bytes), the decoded frame, and the
crop box and flip drawn for it per (seed, epoch, key).
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

from hybridgan.config import BlurConfig, Config
from hybridgan.data.plan import LoaderError, stable_seed
from hybridgan.data.preprocess import Box, crop_box


@dataclass(frozen=True)
class SampleOptions:
    """What turns one stored sample into arrays."""

    image_size: int
    crop_fraction: float
    hflip: bool
    train: bool
    with_blur: bool
    blur: BlurConfig
    seed: int


def sample_options(cfg: Config, train: bool, with_blur: bool = False) -> SampleOptions:
    """What `cfg` asks of each sample: training (random crop, flip) or not, with the blur or not."""
    return SampleOptions(cfg.data.image_size, cfg.data.crop_fraction, cfg.data.hflip, train, with_blur, cfg.blur,
                    cfg.run.seed)


def augmentation(opts: SampleOptions, epoch: int, key: str, frame: int) -> tuple[Box, bool, np.random.Generator]:
    """The crop box and flip of sample `key` in `epoch` (training: drawn per (seed, epoch, key);
    otherwise the centred box, no flip), and the generator they were drawn from, which then draws
    the pretraining blur. The one source of both for the worker and the resident loader."""
    rng = np.random.default_rng(stable_seed(opts.seed, epoch if opts.train else "eval", key))
    box = crop_box(frame, opts.crop_fraction, rng if opts.train else None)
    flip = bool(opts.train and opts.hflip and rng.random() < 0.5)
    return box, flip, rng


_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # key and extension, as WebDataset splits them


def read_shard(path: str, count: int) -> list[tuple[str, bytes]]:
    """(key, JPEG bytes) of every sample of the shard at `path`, in tar order; a read error or a
    sample count other than the manifest's `count` is a LoaderError naming the shard."""
    samples: dict[str, bytes] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                match = _MEMBER.match(member.name)
                if member.isfile() and match and match.group(2) == "jpg":
                    samples[match.group(1)] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise LoaderError(f"{path}: cannot read the shard ({err}); re-pack the dataset "
                          f"(python -m hybridgan.pack)") from None
    if len(samples) != count:
        raise LoaderError(f"{path}: the shard holds {len(samples)} samples, the manifest says {count}; "
                          f"re-pack the dataset (python -m hybridgan.pack)")
    return list(samples.items())


def open_frame(key: str, jpeg: bytes, url: str = "?") -> Image.Image:
    """The decoded RGB frame of one sample; a sample that does not decode is a LoaderError naming
    shard and key."""
    try:
        return Image.open(io.BytesIO(jpeg)).convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise LoaderError(f"{url}: sample {key}: not a readable JPEG ({err}); re-pack the dataset "
                          f"(python -m hybridgan.pack)") from None
