"""Benchmark the input pipeline: images/s and ``data_wait_fraction`` of three ingest paths, and
the one-time cost of a large RecordIO index.

Ingest, on a generated RecordIO of 112 × 112 RGB JPEGs (smooth per-identity colour fields with
per-image noise, shift and brightness; generated once into the cache folder) with random flips:

* ``in-process``: ``loader_workers: 0``, the training thread decodes each batch itself;
* ``dataloader-1``: ``batch_loader`` with one ``DataLoader`` worker process;
* ``ray-data``: the same images packed into Parquet shards (``workers.data.pack``) and streamed
  by the Ray Data pipeline ``data.source: shards`` builds (``train_ingest``, split by
  ``ray.train.DataConfig`` exactly as Ray Train splits it, read by ``shard_batches``), within
  ``--ray-data-cpus`` CPUs, on a local Ray of this machine's CPUs.

The consumer models an accelerator step: the host thread sleeps for the measured in-process
decode time of one batch times ``--compute-ratio`` (the device computes, the host waits), so
decoding that overlaps with the step shows as a lower ``data_wait_fraction`` (the share of the
epoch spent blocked on the next batch, as ``train_epoch`` reports it). ``--epochs`` epochs per
path: the last is reported (steady state), with the first epoch's rate and first-batch wait
(pipeline start-up: loader processes, Ray workers importing the project).

One-time cost, on a synthesised index of ``--index-lines`` records (minimal records: headers
only): the ``.idx`` parse before (``_old_read_index``: a faithful copy of ``_read_index`` at
commit ea94ef0, Python ``str.split`` of the whole text) and after (``RecordIOReader``'s
``np.loadtxt``), and the label scan before (every worker of every trial scanned every record
header: ``RecordIOReader.labels``, unchanged since ea94ef0) and after (``cached_labels``: one
scan per ``.rec``/``.idx`` version, then a cache read).

Usage: ``python bench/ingest.py [--quick] [--images 50000] [--identities 5000]``; results are
merged into ``bench/results/ingest.json`` under ``quick`` or ``full``.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

if __package__ in (None, ""):  # ``python bench/ingest.py``: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.data import (
    MAGIC,
    EpochBatches,
    RecordIOReader,
    batch_loader,
    cached_labels,
    load_recordio,
    open_shards,
    shard_batches,
    shard_steps,
    to_device,
    train_ingest,
    write_recordio,
)
from workers.data.pack import pack

RESULTS = Path(__file__).resolve().parent / "results" / "ingest.json"
HOME = Path(os.environ.get("MARGINLAB_HOME", Path.home() / ".marginlab")).expanduser()
SIZE = 112
Batch = tuple[torch.Tensor, torch.Tensor]


# --- data ------------------------------------------------------------------------------------
def generate_recordio(folder: Path, images: int, identities: int, seed: int = 0) -> Path:
    """``folder/train.rec`` of ``images`` JPEGs of ``identities`` identities (made once)."""
    if (folder / "train.idx").is_file():
        return folder
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.integers(0, identities, images))
    bases = {}
    payloads = []
    for label in labels.tolist():
        if label not in bases:
            small = Image.fromarray(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8))
            bases[label] = np.asarray(small.resize((SIZE + 16, SIZE + 16),
                                                   Image.Resampling.BICUBIC), dtype=np.float32)
        dy, dx = rng.integers(0, 17, 2)
        face = bases[label][dy:dy + SIZE, dx:dx + SIZE] * rng.uniform(0.8, 1.2)
        face += rng.normal(0.0, 6.0, face.shape)
        buffer = io.BytesIO()
        Image.fromarray(face.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG",
                                                                 quality=90)
        payloads.append(buffer.getvalue())
    write_recordio(folder, payloads, labels.tolist(), (SIZE, SIZE), identities)
    return folder


def packed_shards(recordio: Path, folder: Path, shard_mb: float) -> tuple[Path, float | None]:
    """The RecordIO packed into shards (every identity trains), made once; the pack's
    seconds when it ran now."""
    if (folder / "manifest.json").is_file():
        return folder, None
    started = time.perf_counter()
    pack(load_recordio(recordio, SIZE, 3), folder, source={"kind": "recordio",
                                                           "path": str(recordio)},
         heldout_fraction=0.0, seed=0, shard_bytes=int(shard_mb * 2**20))
    return folder, time.perf_counter() - started


# --- ingest ----------------------------------------------------------------------------------
def consume(batches: Iterator[Batch], steps: int, compute_seconds: float) -> dict[str, float]:
    """Run ``steps`` steps of ``compute_seconds`` each; time spent waiting for batches."""
    wait = first = 0.0
    images = 0
    started = time.perf_counter()
    for step in range(steps):
        waiting = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - waiting
        wait += waited
        first = waited if step == 0 else first
        inputs, _ = to_device(batch, torch.device("cpu"))
        images += len(inputs)
        time.sleep(compute_seconds)
    elapsed = time.perf_counter() - started
    return {"images_per_second": images / elapsed, "data_wait_fraction": wait / elapsed,
            "seconds": elapsed, "steps": steps, "images": images, "first_batch_seconds": first}


def decode_seconds(batches: EpochBatches, samples: int = 8) -> float:
    """Median in-process time to build one batch (read, decode, flip)."""
    times = []
    for step in range(min(samples, len(batches))):
        started = time.perf_counter()
        batches[step]
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def ray_data_split(shards: Path, batch: int, cpus: float, seed: int) -> tuple[Any, int]:
    """One rank's split of the dataset ``train_ingest`` builds, made by its ``DataConfig`` as
    Ray Train makes it (``streaming_split(1, equal=True)`` with the CPU limit), and the
    steps per epoch; ``shard_batches`` reads it as a worker does."""
    datasets, config = train_ingest({"source": "shards", "path": str(shards), "flip": True,
                                     "ray_data_cpus": cpus}, seed)
    (split,) = config.configure(datasets, world_size=1, worker_handles=None,
                                worker_node_ids=None)
    return split["train"], shard_steps(open_shards(shards).manifest.train.rows, 1, batch)


def _row(path: str, epochs: list[dict[str, float]], **extra: Any) -> dict[str, Any]:
    """The last epoch's figures (steady state) and the first epoch's start-up."""
    print(f"  {path}: {epochs[-1]['images_per_second']:.0f} images/s", flush=True)
    return {"path": path, **extra, **epochs[-1],
            "first_epoch_images_per_second": epochs[0]["images_per_second"],
            "first_epoch_first_batch_seconds": epochs[0]["first_batch_seconds"]}


def ingest(recordio: Path, shards: Path, batch: int, epochs: int, compute_ratio: float,
           ray_data_cpus: float) -> dict[str, Any]:
    """``epochs`` epochs of each path, the consumer's step sized from the measured decode
    time of a batch."""
    dataset = load_recordio(recordio, SIZE, 3, flip=True)
    decode = decode_seconds(EpochBatches(dataset, batch, 0, 1, 0, seed=0))
    compute = decode * compute_ratio
    rows = []
    for name, workers in (("in-process", 0), ("dataloader-1", 1)):
        runs = []
        for epoch in range(epochs):
            batches = EpochBatches(dataset, batch, 0, 1, epoch, seed=0)
            loader = iter(batch_loader(batches, workers, torch.device("cpu")))
            runs.append(consume(loader, len(batches), compute))
        rows.append(_row(name, runs))
    import ray

    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        split, steps = ray_data_split(shards, batch, ray_data_cpus, seed=0)
        runs = [consume(shard_batches(split, open_shards(shards), batch, steps, 0, epoch, 0,
                                      torch.device("cpu")), steps, compute)
                for epoch in range(epochs)]
        rows.append(_row("ray-data", runs, ray_data_cpus=ray_data_cpus))
    finally:
        ray.shutdown()
    return {"batch": batch, "epochs": epochs, "decode_seconds_per_batch": decode,
            "decode_images_per_second": batch / decode, "compute_seconds_per_step": compute,
            "rows": rows}


# --- one-time index cost ---------------------------------------------------------------------
def synthesise_index(folder: Path, lines: int) -> Path:
    """``folder/train.rec`` of ``lines`` header-only records (label = key mod 100 000) and its
    ``train.idx`` (made once)."""
    rec, idx = folder / "train.rec", folder / "train.idx"
    if idx.is_file():
        return rec
    folder.mkdir(parents=True, exist_ok=True)
    record = np.dtype([("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"),
                       ("id", "<u8"), ("id2", "<u8")])
    keys = np.arange(1, lines + 1, dtype=np.int64)
    frames = np.zeros(lines, dtype=record)
    frames["magic"], frames["lrec"] = MAGIC, 24
    frames["label"], frames["id"] = keys % 100_000, keys
    frames.tofile(rec)
    offsets = (keys - 1) * record.itemsize
    with idx.open("w") as handle:
        for start in range(0, lines, 1 << 20):
            part = slice(start, start + (1 << 20))
            handle.write("".join(f"{k}\t{o}\n" for k, o in zip(keys[part].tolist(),
                                                                offsets[part].tolist(),
                                                                strict=True)))
    return rec


def _old_read_index(idx_path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``RecordIOReader._read_index`` as of commit ea94ef0 (the baseline), error paths
    reduced to their checks."""
    text = idx_path.read_text()
    lines = [number for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    table = np.array(text.split(), dtype=np.int64).reshape(len(lines), 2)
    order = np.argsort(table[:, 0], kind="stable")
    keys, offsets = table[order, 0], table[order, 1]
    past = np.flatnonzero((offsets + 8 > size) | (offsets < 0))
    if len(past):
        raise ValueError(f"{idx_path}:{lines[int(order[past[0]])]}: offset past the end")
    if len(keys) and (keys[0] < 0 or np.any(keys[1:] == keys[:-1])):
        raise ValueError(f"{idx_path}: keys must be distinct and ≥ 0")
    return keys, offsets


def _timed(fn: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def one_time(folder: Path, lines: int) -> dict[str, Any]:
    """Index parse and label scan of a ``lines``-record set, before and after."""
    rec = synthesise_index(folder, lines)
    idx = rec.with_suffix(".idx")
    for stale in folder.glob("*.labels.npz"):
        stale.unlink()
    old_seconds, (old_keys, old_offsets) = _timed(lambda: _old_read_index(idx,
                                                                          rec.stat().st_size))
    new_seconds, reader = _timed(lambda: RecordIOReader(rec, idx))
    if not (np.array_equal(old_keys, reader.keys) and np.array_equal(old_offsets,
                                                                      reader.offsets)):
        raise RuntimeError("the two index parsers disagree")
    scan_seconds, labels = _timed(lambda: reader.labels(reader.keys))
    first_seconds, _ = _timed(lambda: cached_labels(reader, reader.keys))
    hit_seconds, cached = _timed(lambda: cached_labels(reader, reader.keys))
    if not np.array_equal(labels, cached):
        raise RuntimeError("cached labels differ from the scan")
    return {"lines": lines, "idx_bytes": idx.stat().st_size, "rec_bytes": rec.stat().st_size,
            "index_parse_before_seconds": old_seconds, "index_parse_after_seconds": new_seconds,
            "label_scan_before_seconds": scan_seconds,
            "label_scan_first_after_seconds": first_seconds,
            "label_scan_after_seconds": hit_seconds}


# --- driver ----------------------------------------------------------------------------------
def table(result: dict[str, Any]) -> None:
    """Print both tables."""
    data, run, meta = result["dataset"], result["ingest"], result["meta"]
    print(f"\n{meta['cpus']} CPUs, 1-minute load average {meta['load_average_1m_at_start']:.1f} "
          f"at start, {meta['load_average_1m_at_end']:.1f} at end")
    print(f"ingest: {data['images']} JPEGs {SIZE}×{SIZE} RGB, {data['identities']} identities, "
          f"{data['shards']} shards; batch {run['batch']}; in-process decode "
          f"{run['decode_images_per_second']:.0f} images/s; consumer step "
          f"{1e3 * run['compute_seconds_per_step']:.1f} ms (sleep)")
    print(f"last of {run['epochs']} epochs per path; first epoch: its images/s and the wait "
          "for its first batch (start-up)")
    print(f"{'path':<18} {'images/s':>9} {'wait frac':>9} {'epoch s':>8} {'1st ep img/s':>12} "
          f"{'1st batch s':>11}")
    for row in run["rows"]:
        name = row["path"] + (f" ({row['ray_data_cpus']:g} CPU)" if "ray_data_cpus" in row
                              else "")
        print(f"{name:<18} {row['images_per_second']:>9.0f} {row['data_wait_fraction']:>9.3f} "
              f"{row['seconds']:>8.1f} {row['first_epoch_images_per_second']:>12.0f} "
              f"{row['first_epoch_first_batch_seconds']:>11.2f}")
    once = result["one_time"]
    print(f"\none-time, {once['lines']:,} records (.idx {once['idx_bytes'] / 2**20:.0f} MiB):")
    print(f"{'':<12} {'before s':>9} {'after s':>9}")
    print(f"{'idx parse':<12} {once['index_parse_before_seconds']:>9.2f} "
          f"{once['index_parse_after_seconds']:>9.2f}")
    print(f"{'label scan':<12} {once['label_scan_before_seconds']:>9.2f} "
          f"{once['label_scan_after_seconds']:>9.2f}   (first run after: scan + cache write "
          f"{once['label_scan_first_after_seconds']:.2f} s, once per dataset version)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="5000 images, 500 identities, a 500 000-line index")
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--identities", type=int, default=5_000)
    parser.add_argument("--index-lines", type=int, default=5_000_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2,
                        help="epochs per path; the last one is reported (steady state)")
    parser.add_argument("--compute-ratio", type=float, default=1.0,
                        help="consumer step time / in-process decode time of a batch")
    parser.add_argument("--ray-data-cpus", type=float, default=1.0)
    parser.add_argument("--shard-mb", type=float, default=32.0,
                        help="shard size of the benchmark pack (small: several shards)")
    parser.add_argument("--cache", type=Path, default=HOME / "bench" / "ingest",
                        help="where the generated data is kept between runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.identities, args.index_lines = 5_000, 500, 500_000
        args.shard_mb = min(args.shard_mb, 8.0)
    torch.set_num_threads(1)
    folder = args.cache / f"{args.images}-{args.identities}"
    print(f"data in {folder}", flush=True)
    started = time.perf_counter()
    recordio = generate_recordio(folder / "recordio", args.images, args.identities)
    generated = time.perf_counter() - started
    shards, pack_seconds = packed_shards(recordio, folder / f"shards-{args.shard_mb:g}mb",
                                         args.shard_mb)
    manifest = open_shards(shards).manifest
    result: dict[str, Any] = {
        "meta": {"torch": torch.__version__, "cpus": os.cpu_count(),
                 "date": datetime.date.today().isoformat(),
                 # other processes compete for the cores: read the figures against it
                 "load_average_1m_at_start": os.getloadavg()[0]},
        "dataset": {"images": args.images, "identities": args.identities,
                    "rec_bytes": (recordio / "train.rec").stat().st_size,
                    "shards": len(manifest.train.shards), "shard_mb": args.shard_mb,
                    "prepare_seconds": generated, "pack_seconds": pack_seconds},
    }
    print(f"ingest ({args.epochs} epochs per path) ...", flush=True)
    result["ingest"] = ingest(recordio, shards, args.batch, args.epochs, args.compute_ratio,
                              args.ray_data_cpus)
    print(f"one-time cost, {args.index_lines:,}-line index ...", flush=True)
    result["one_time"] = one_time(args.cache / f"index-{args.index_lines}", args.index_lines)
    result["meta"]["load_average_1m_at_end"] = os.getloadavg()[0]
    table(result)
    stored = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    stored["quick" if args.quick else "full"] = result
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(stored, indent=1))
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
