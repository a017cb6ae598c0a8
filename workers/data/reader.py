"""Reading WebDataset shards: a streaming, per-rank partitioned ``IterableDataset`` over shard slices.

Partitioning across ranks and DataLoader workers
------------------------------------------------
A :class:`ShardDataset` stream is consumed by ``S = world_size * num_loader_workers`` *slots*; slot
``rank * num_loader_workers + worker_id`` is one (rank, DataLoader worker) pair. Epoch ``e`` is one pass over the
subset's ``n`` samples in the epoch's slice order (shuffled with ``Random(f"slices-{seed}-{e}")`` when
``train=True``, identically on every rank). Slot ``s`` reads the contiguous range of that sequence of length

    n_s(e) = floor(((e + 1) * n + s) / S) - floor((e * n + s) / S)        (:func:`epoch_share`)

after the ranges of slots ``0 .. s-1``. So the partition of epoch ``e`` depends only on (seed, e, slot, S): the
slots' epoch-``e`` streams are disjoint and cover the subset exactly once, however far apart in time the slots are.

Why balanced ranges and not whole shards per slot: under DDP every rank takes the same number of batches (and a
rank's DataLoader workers deliver batches in turn), so all slots advance at the same number of samples. Dealing
whole shards made the slots' epochs differ in length (shards [25, 25, 4] on 2 ranks: 50 or 29 vs 4 or 25), so
the slots cycled at different rates and any window over-sampled whichever shards sat in the short epochs (counts
350-380 where 355 is exact). With the rule above the sizes differ by at most one, and the extra samples rotate
over slots: a slot's cumulative count after epochs ``0 .. e-1`` is ``floor((e * n + s) / S)``, the same for all
slots up to one sample. So slots that have each produced ``m`` samples never drift apart, and when ``m = K * n / S``
is whole, every slot has finished exactly epochs ``0 .. K-1``: every sample was seen exactly ``K`` times (from
any starting epoch; the per-slot shuffle buffer is drained at each epoch's end, so it never mixes epochs).

Cost: a slot reads its range shard by shard; a range that starts inside a shard streams past that shard's first
samples without decoding them (tar has no index), at most one shard per slot and epoch. With fewer shards than
slots this reads far less than every slot reading everything. A slot that would receive no samples at all (subset
smaller than the number of slots) is an error. With ``repeat=True`` the stream is infinite, so every rank can take
the same fixed number of batches and DDP never waits on a rank that ran out.

Memory cache: a shard slice read whole and clean (no problem reported, checksum matched) keeps its raw records in
the reading process, and every decoded image is kept too, both up to ``cache_mb`` per process (first come, first
kept). Later epochs and evaluation passes then read nothing from storage and decode nothing: on the 16 px digits
the tar parsing and PNG decoding were about half of the loader's time (docs/benchmarks.md). The order, the
augmentation and the random draws are the same with or without the cache.

Epoch numbers: each ``iter()`` is the next epoch of its process (see :class:`ShardDataset`); ``set_epoch`` writes
to memory that :func:`make_loader` shares with its persistent workers, so it reaches workers that already run.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.shardlists import expand_urls

from workers.config import AugmentConfig
from workers.data.augment import eval_array, needed_shorter_side, train_view, uint8_tensor
from workers.data.fractions import ShardSlice
from workers.data.permute import PermuteSpec, apply_permutation, permutation
from workers.data.shard_format import ChecksumError, DataError, Record, read_shard

log = logging.getLogger(__name__)


def decode_pil(data: bytes, shorter_side: int | None = None) -> Image.Image:
    """Decode PNG/JPEG bytes to an RGB PIL image; a JPEG at least twice ``shorter_side`` is decoded smaller.

    ``Image.draft`` makes libjpeg scale by 1/2, 1/4 or 1/8 inside the IDCT, choosing the largest reduction that
    still leaves both sides >= the request, so the decoded shorter side stays >= ``shorter_side`` (what the view
    needs: ``workers.data.augment.needed_shorter_side``). Skipping IDCT work is the point: a 1024 px q95 JPEG needed at
    shorter side 256 (the 224 px eval view) decodes at 1/4 scale about 2x faster (entropy decoding remains).
    Other formats decode at full size.
    """
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    if shorter_side is not None and img.format == "JPEG" and min(w, h) >= 2 * shorter_side:
        # integer maths: the request for the shorter side is exactly shorter_side, never a float's 1 px less
        img.draft("RGB", (w * shorter_side // min(w, h), h * shorter_side // min(w, h)))
    img.load()  # reads the pixels and lets go of the byte stream
    # An RGB image as decoded: convert("RGB") would copy it, a tenth of a 224 px view's time.
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(data: bytes, shorter_side: int | None = None) -> np.ndarray:
    """Decode PNG/JPEG bytes to an HxWx3 uint8 array (see :func:`decode_pil` for ``shorter_side``)."""
    return np.asarray(decode_pil(data, shorter_side), dtype=np.uint8)


MAX_LOADER_WORKERS = 64  # rows of ShardDataset's shared problem counters


def iter_samples(urls: str | list[str]) -> Iterator[Record]:
    """(key, image bytes, label) of every sample of whole shards, in order, unpartitioned and without checksum
    checks (tests and benchmarks; training reads through :class:`ShardDataset`).

    Args:
        urls: shard URLs, or a webdataset brace pattern ("dir/shard-{000000..000003}.tar"; "::" separates several).
    """
    for url in expand_urls(urls) if isinstance(urls, str) else list(urls):
        yield from read_shard(url)


def _slot() -> tuple[int, int]:
    """(DataLoader worker id, number of workers) of the calling process; (0, 1) outside DataLoader workers."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def epoch_share(num_samples: int, slot: int, num_slots: int, epoch: int) -> tuple[int, int]:
    """(start, count): the contiguous range of epoch ``epoch``'s sample sequence that ``slot`` reads.

    ``count = floor(((epoch + 1) * n + slot) / S) - floor((epoch * n + slot) / S)`` and the ranges follow each
    other in slot order, so they tile ``[0, n)``; the module docstring explains why the counts rotate like this.
    """
    if not 0 <= slot < num_slots or num_samples < 0 or epoch < 0:
        raise ValueError(f"bad share request: slot {slot} of {num_slots}, {num_samples} samples, epoch {epoch}")

    def count(s: int) -> int:
        return ((epoch + 1) * num_samples + s) // num_slots - (epoch * num_samples + s) // num_slots

    return sum(count(s) for s in range(slot)), count(slot)


def _shuffled(items: Iterable, buffer_size: int, rng: random.Random) -> Iterator:
    """Streaming shuffle: keep ``buffer_size`` items, emit a random one for each new item, then drain."""
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(len(buffer))
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


_UNIT_LEVELS = np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)  # x / 127.5 - 1, float32
_UNIT_LEVELS.flags.writeable = False
_TORCH_MIN_PIXELS = 48 * 48  # from here on torch's vectorised convert + divide beats the per-call cheaper look-up


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 in [-1, 1]: ``x / 127.5 - 1`` in float32, the same bits either way.

    Small images (the 16-32 px digits) look the 256 levels up, transposing in the same pass (torch's per-call cost
    is larger than their arithmetic); larger ones convert and divide with torch's vectorised kernels (at 224 px a
    sixth of the time of numpy's convert, divide, subtract).
    """
    if image.shape[0] * image.shape[1] < _TORCH_MIN_PIXELS:
        return torch.from_numpy(_UNIT_LEVELS[image.transpose(2, 0, 1)])
    # A read-only view is read in place (.to() makes the float copy): a defensive uint8 copy cost 3 % of a fast
    # 224 px view's time.
    pixels = uint8_tensor(image).permute(2, 0, 1)
    return pixels.to(torch.float32, memory_format=torch.contiguous_format).div_(127.5).sub_(1.0)


def normalised_batch(samples: list[tuple]) -> list:
    """``make_loader``'s collate: samples of (HxWx3 uint8 view, label[, key]) as one (images, labels[, keys]) batch,
    the views stacked as uint8 and converted once, (B, 3, H, W) float32 ``x / 127.5 - 1``: the bits of
    :func:`to_tensor` per image, in one conversion per batch instead of one float tensor per image (+11-14 %
    samples/s per core for the paper's fast train view, +17-22 % for the eval view, docs/benchmarks.md). Views below
    48 x 48 px come as float already (:class:`ShardDataset`) and are stacked as they are.

    Args:
        samples: what :class:`ShardDataset` yields with ``uint8_views`` on.
    """
    images, *rest = default_collate(samples)
    if images.dtype == torch.uint8:
        images = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        images = images.div_(127.5).sub_(1.0)
    return [images, *rest]


class ShardDataset(IterableDataset):
    """Stream (image (3,H,W) float32 in [-1, 1], label int) from shard slices, partitioned over ranks and workers.

    ``make_loader`` switches the dataset to ``uint8_views``: it then yields each view of 48 x 48 px or more as an
    HxWx3 uint8 tensor and the loader's collate (:func:`normalised_batch`) makes the float batch, the same bits.

    ``return_keys=True`` appends each sample's ``__key__`` (for tests and debugging). ``permute`` = (mode, patch,
    seed) (``workers.data.permute.permute_spec`` of a DataConfig) moves the pixels of every view, train and eval alike,
    by that one fixed permutation (the paper's Fig. 4 study); None (or mode "none") keeps the images.

    See the module docstring for the partitioning rule. Epochs: the k-th ``iter()`` in a process since the last
    ``set_epoch(e)`` (or since construction, e = 0) starts at epoch ``e + k``; with ``repeat=True`` one ``iter()``
    is the endless sequence of epochs from there. The epoch is taken when ``iter()`` is called, not when the first
    sample is asked for, so persistent DataLoader workers (``make_loader``), which all call ``iter()`` once per
    loader pass, stay in step even when a pass is abandoned early. ``set_epoch`` stores the epoch in memory that
    ``make_loader`` shares with the workers, so it reaches workers that already run. With other loaders (e.g.
    non-persistent workers: fresh copies of the main-process object each pass, whose own count never moves), call
    ``set_epoch`` before every pass, as with ``DistributedSampler``.
    """

    def __init__(
        self,
        slices: list[ShardSlice],
        *,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        repeat: bool = False,
        shuffle_buffer: int = 256,
        augment: AugmentConfig | None = None,
        image_size: int | None = None,
        return_keys: bool = False,
        permute: PermuteSpec | tuple[str, int, int] | None = None,
        on_error: str = "raise",
        verify_checksums: bool = True,
        cache_mb: float = 0.0,
    ):
        super().__init__()
        self.slices = list(slices)
        if not self.slices or any(s.num_samples <= 0 for s in self.slices):
            raise ValueError("ShardDataset needs at least one slice, each with num_samples > 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        if shuffle_buffer < 0:
            raise ValueError("shuffle_buffer must be >= 0")
        if image_size is not None and image_size <= 0:
            raise ValueError(f"image_size must be positive (or None: the decoded size), got {image_size}")
        self.train, self.rank, self.world_size, self.seed = train, rank, world_size, seed
        self.repeat, self.shuffle_buffer = repeat, shuffle_buffer
        # Views (workers.data.augment): training samples get train_view(augment), the others eval_array(augment).
        # image_size None keeps the decoded size (square shards, tests): the views then work at the decoded
        # shorter side with crop fraction 1, so an eval view or crop "none" of a square image is the image itself.
        augment = augment or AugmentConfig()
        self.image_size = image_size
        self.augment = augment if image_size else augment.model_copy(update={"eval_crop_fraction": 1.0})
        self._decode_side = image_size and needed_shorter_side(image_size, self.augment, train)
        self.return_keys = return_keys
        self.uint8_views = False  # yield HxWx3 uint8 tensors for normalised_batch (make_loader turns it on)
        # The fixed pixel permutation (workers.data.permute), applied to each view after augmentation, before to_tensor.
        self.permute = PermuteSpec(*permute) if permute is not None and permute[0] != "none" else None
        if self.permute and image_size:  # fail now on a bad patch size, not in the first DataLoader worker
            permutation(self.permute.mode, image_size, self.permute.patch, self.permute.seed)
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error, self.verify_checksums = on_error, verify_checksums
        if cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {cache_mb}")
        # The memory cache (module docstring): raw records of whole clean slices, and decoded images, per process.
        self.cache_bytes, self._cache_used = int(cache_mb * 2**20), 0
        self._cached_records: dict[str, list[Record]] = {}
        self._decoded: dict[tuple[str, str], np.ndarray] = {}
        # [loader worker slot, (samples skipped, shards failing their checksum)], summed by problem_counts(); one row
        # per DataLoader worker so no two processes add to the same number. Shared by make_loader like _epoch_state.
        self._problems = torch.zeros(MAX_LOADER_WORKERS + 1, 2, dtype=torch.int64)
        self.num_samples = sum(s.num_samples for s in self.slices)
        self._check_slots(world_size)
        # [epoch of the last set_epoch, how many set_epoch calls]. DataLoader workers hold their own copies of this
        # object, and persistent ones outlive the main process's later calls, so make_loader moves this tensor to
        # shared memory (not done here: each shared tensor keeps a file descriptor open while it lives).
        self._epoch_state = torch.zeros(2, dtype=torch.int64)
        self._generation = 0  # the set_epoch count this process's _passes refers to
        self._passes = 0  # iter() calls in this process since that set_epoch

    def problem_counts(self) -> tuple[int, int]:
        """(samples skipped, shards whose checksum failed) so far, over this process and its loader workers; only
        ``on_error="skip"`` counts (``raise`` stops at the first problem)."""
        skipped, bad_shards = self._problems.sum(dim=0).tolist()
        return int(skipped), int(bad_shards)

    def _record_problem(self, error: DataError, lost: int) -> None:
        """The ``on_error`` policy: raise ``error``, or count it (and log it) and go on."""
        if self.on_error == "raise":
            raise error
        info = get_worker_info()
        row = self._problems[0 if info is None else 1 + info.id % MAX_LOADER_WORKERS]
        row[0] += lost
        row[1] += int(isinstance(error, ChecksumError))
        log.warning("data.on_error=skip: %s (%d samples skipped)", error, lost)

    def set_epoch(self, epoch: int) -> None:
        """The next ``iter()`` here and in every worker of a ``make_loader`` loader (running or not) is ``epoch``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch_state[0] = epoch
        self._epoch_state[1] += 1
        self._generation, self._passes = int(self._epoch_state[1]), 0

    def _next_epoch(self) -> int:
        base, generation = (int(v) for v in self._epoch_state.tolist())
        if generation != self._generation:  # set_epoch was called in another process (the loader's main process)
            self._generation, self._passes = generation, 0
        self._passes += 1
        return base + self._passes - 1

    def _check_slots(self, num_slots: int) -> None:
        if self.num_samples < num_slots:
            raise ValueError(
                f"the subset has {self.num_samples} samples but {num_slots} data slots (world_size {self.world_size}"
                " x DataLoader workers) would read it, so some slot would get no samples: use a larger fraction,"
                " fewer workers or fewer ranks"
            )

    def slot_records(self, slot: int, num_slots: int, epoch: int) -> Iterator[tuple[str, bytes, int, str]]:
        """One epoch of raw (key, image bytes, label, shard URL) for one slot, before shuffling and augmentation.

        The slot's :func:`epoch_share` of the epoch's slice order; a function of (seed, epoch, slot, num_slots) only.
        """
        order = list(range(len(self.slices)))
        if self.train:  # "seed-epoch", not seed + epoch: a run seeded s + 1 must not replay epoch 1 of seed s
            random.Random(f"slices-{self.seed}-{epoch}").shuffle(order)
        start, count = epoch_share(self.num_samples, slot, num_slots, epoch)
        stop, offset = start + count, 0
        for i in order:
            if offset >= stop:
                return
            piece = self.slices[i]
            lo, hi = max(start - offset, 0), min(stop - offset, piece.num_samples)
            offset += piece.num_samples
            if lo < hi:  # the first `lo` records are streamed past (read, never decoded)
                cached = self._cached_records.get(piece.url)
                records = iter(cached[:hi]) if cached is not None else self._read_slice(piece, hi)
                for key, image, label in itertools.islice(records, lo, None):
                    yield key, image, label, piece.url

    def _read_slice(self, piece: ShardSlice, limit: int) -> Iterator[Record]:
        """``shard_format.read_shard`` of the slice's first ``limit`` records; a whole slice read with no problem
        reported (nothing skipped, the checksum matched) stays in the memory cache if it fits."""
        problems: list[DataError] = []

        def on_error(error: DataError, lost: int) -> None:
            problems.append(error)
            self._record_problem(error, lost)

        kept: list[Record] | None = [] if limit == piece.num_samples and self.cache_bytes else None
        for record in read_shard(piece.url, limit, piece.sha256 if self.verify_checksums else None, on_error):
            if kept is not None:
                kept.append(record)
            yield record
        if kept is not None and not problems and len(kept) == piece.num_samples:
            size = sum(len(image) + len(key) + 64 for key, image, _ in kept)
            if self._cache_used + size <= self.cache_bytes:
                self._cached_records[piece.url] = kept
                self._cache_used += size

    def _epoch_samples(self, slot: int, num_slots: int, epoch: int) -> Iterator[tuple]:
        records = self.slot_records(slot, num_slots, epoch)
        rng = random.Random(f"samples-{self.seed}-{epoch}-{slot}")
        if self.train and self.shuffle_buffer > 1:
            records = _shuffled(records, self.shuffle_buffer, rng)
        for key, image_bytes, label, url in records:
            decoded = self._decoded.get((url, key))
            if decoded is None:
                try:
                    decoded = decode_pil(image_bytes, self._decode_side)
                except Exception as exc:  # noqa: BLE001 - PIL raises several types for bad bytes
                    failure = DataError(f"shard {url}: sample {key}: undecodable image ({type(exc).__name__}: {exc})")
                else:
                    failure = None
                if failure is not None:  # outside the except block: the user sees this error, not a chain
                    self._record_problem(failure, 1)
                    continue
                if self._cache_used + decoded.width * decoded.height * 3 + 200 <= self.cache_bytes:
                    # Kept as a read-only array: turning a PIL image into one cost 40 % of a cached sample's time.
                    decoded = np.asarray(decoded)
                    decoded.flags.writeable = False
                    self._decoded[(url, key)] = decoded
                    self._cache_used += decoded.nbytes + 200
            size = self.image_size or min(decoded.shape[:2] if isinstance(decoded, np.ndarray) else decoded.size)
            if self.train:
                image = train_view(decoded, size, self.augment, rng)
            else:
                image = eval_array(decoded, size, self.augment)
            if self.permute:  # the same permutation for every image (cached per size)
                image = apply_permutation(image, permutation(self.permute.mode, size, self.permute.patch,
                                                             self.permute.seed))
            if self.uint8_views and image.shape[0] * image.shape[1] >= _TORCH_MIN_PIXELS:
                view = uint8_tensor(np.ascontiguousarray(image))  # normalised_batch makes it float
            else:  # small views: to_tensor's look-up costs less than a uint8 tensor and its batch conversion
                view = to_tensor(image)
            yield (view, label, key) if self.return_keys else (view, label)

    def __iter__(self) -> Iterator[tuple]:
        # Not a generator itself: the slot and epoch are fixed now, at iter() time (see the class docstring).
        worker_id, num_workers = _slot()
        num_slots = self.world_size * num_workers
        self._check_slots(num_slots)
        return self._stream(self.rank * num_workers + worker_id, num_slots, self._next_epoch())

    def _stream(self, slot: int, num_slots: int, epoch: int) -> Iterator[tuple]:
        while True:
            yield from self._epoch_samples(slot, num_slots, epoch)
            if not self.repeat:
                return
            epoch += 1


def make_loader(dataset: ShardDataset, batch_size: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """DataLoader over a ShardDataset: drops the last partial batch of repeating (training) streams only.

    ``pin_memory``: page-locked batches for faster, asynchronous host-to-GPU copies (pass it when training on CUDA).

    Workers are persistent, so each one keeps its epoch count across passes (see :class:`ShardDataset`), and
    ``in_order=True`` makes the loader take batches from its workers strictly in turn, so with ``repeat=True`` all
    slots of a rank advance at the same number of samples, which the exactness of every pass relies on. The
    dataset is switched to ``uint8_views`` and each batch normalised once (:func:`normalised_batch`).
    """
    dataset.uint8_views = True  # one float conversion per batch (normalised_batch), not one per image
    if num_workers > 0:
        dataset._epoch_state.share_memory_()  # in place: set_epoch in this process reaches the workers
        dataset._problems.share_memory_()  # and the workers' problem counts reach this process
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=dataset.repeat,
        persistent_workers=num_workers > 0,
        in_order=True,
        pin_memory=pin_memory,
        collate_fn=normalised_batch,
    )
