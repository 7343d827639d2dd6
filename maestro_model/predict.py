"""`maestro-model predict`: a trained MAESTRO over a shard set -> maps on the label grid (``maestro_data.maps``).

Each rank takes the WHOLE tiles i with i % world == rank (not the StreamLoader: its eval mode spreads one tile's
crops over ranks), runs every crop (x 8 D4 elements with ``tta``), averages the logits per tile on the target grid,
and writes the tile's outputs atomically, then its record ``_tiles/<key>.json`` last: a tile with a record is done
and skipped by a rerun (resume). No rank reads another's files until ``wait_for_everyone``; then rank 0 writes the
mosaic VRT, the GeoJSON / CSV and ``metrics.json`` from the records of the run's tiles.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from maestro_data import georef, maps
from maestro_data.errors import MaestroError
from maestro_data.manifest import Manifest, TargetSpec
from maestro_data.stream.augment import crop_window, d4_inverse
from maestro_data.stream.cache import Access
from maestro_data.stream.collate import BatchBuffer, SampleTransform, TransformOptions, label_table
from maestro_data.stream.device import d4_apply_torch, to_model_batch
from maestro_data.stream.index_format import tile_id_of
from maestro_data.stream.shard_read import open_index, stored_manifest
from maestro_data.stream.shard_table import ShardReader, ShardTable, load_table, shard_spans
from maestro_data.unlabelled import is_labelled, without_targets
from maestro_model.metrics import THRESHOLD, MultilabelCounts, SegmentationCounts
from maestro_model.predict_model import load_predictor
from maestro_model.predict_tiles import TileSum, rank_tiles

log = logging.getLogger(__name__)
RECORDS = "_tiles"


class PredictError(MaestroError):
    """A prediction that cannot run (names the checkpoint, index or tile)."""


@dataclass(frozen=True)
class PredictOptions:
    checkpoint: str
    index: str
    out: Path
    split: str = "test"  # a split name or "all"
    tta: bool = False
    probabilities: bool = False
    batch_size: int = 8
    ema: bool = True
    quiet: bool = False


@dataclass(frozen=True)
class RunTile:
    split: str
    table: ShardTable
    tile: int  # index in its table
    key: str


def _run_tiles(index: dict, location: str, manifest: Manifest, split: str, access) -> list[RunTile]:
    """Every tile of the run, in index order (split, shard, sample): the same list on every rank."""
    splits = [s for s in manifest.splits.names if s in index["splits"]] if split == "all" else [split]
    if split != "all" and split not in index["splits"]:
        raise PredictError(f"{location}: no split {split!r} (has {', '.join(index['splits'])})")
    out = []
    for s in splits:
        if not index["splits"][s]["samples"]:
            continue
        table = load_table(index, location, manifest, s, 100)
        for shard in range(table.num_shards):
            spans = shard_spans(table, shard, access)
            out += [RunTile(s, table, int(table.starts[shard]) + j, sp.key) for j, sp in enumerate(spans)]
    return out


def _record_path(out: Path, key: str) -> Path:
    return out / RECORDS / f"{key}.json"


class Predictor:
    """One rank's prediction run (see the module docstring)."""

    def __init__(self, options: PredictOptions, accelerator):
        self.o, self.acc = options, accelerator
        self.device = accelerator.device
        self.index, self.location = open_index(options.index)
        data_manifest = stored_manifest(self.index, self.location)
        self.labelled = is_labelled(self.index)
        self.model, self.what = load_predictor(options.checkpoint, data_manifest, ema=options.ema)
        self.model.to(self.device).eval()
        self.manifest = self.model.manifest  # its targets are the heads' outputs
        if {m: s.tile_size for m, s in data_manifest.modalities.items()} != \
                {m: s.tile_size for m, s in self.manifest.modalities.items()}:
            raise PredictError(f"{options.checkpoint}: trained on modalities {sorted(self.manifest.modalities)} "
                               f"({self.manifest.name}), the shards at {self.location} hold "
                               f"{sorted(data_manifest.modalities)} ({data_manifest.name})")
        self.reader_manifest = data_manifest if self.labelled else without_targets(data_manifest)
        self.transform = SampleTransform(self.reader_manifest, TransformOptions(mode="eval", d4=False))
        self.elements = list(range(8)) if options.tta else [0]
        self.targets = dict(self.manifest.targets)
        # the target windows of each eval crop, from the model's targets (an unlabelled reader manifest has none)
        self.windows = [{n: crop_window(t, o) for n, t in self.targets.items() if t.type == "segmentation"}
                        for o in self.transform.origins]
        self.colors = {n: maps.palette(t.num_classes, getattr(t, "colors", None)) for n, t in self.targets.items()}

    # ------------------------------------------------------------------------------------------ per rank
    def run(self) -> dict:
        rank, world = self.acc.process_index, self.acc.num_processes
        self.access = Access()
        tiles = _run_tiles(self.index, self.location, self.reader_manifest, self.o.split, self.access)
        mine = [tiles[i] for i in rank_tiles(len(tiles), rank, world)]
        todo = [t for t in mine if not _record_path(self.o.out, t.key).is_file()]
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"predict rank {rank}", unit="tile",
                   disable=self.o.quiet or not self.acc.is_local_main_process)
        with torch.no_grad():
            for tile_sum in self._predict(todo):
                self._write_tile(tile_sum)
                bar.update(1)
        bar.close()
        self.acc.wait_for_everyone()
        summary = self._finish(tiles) if self.acc.is_main_process else {}
        self.acc.wait_for_everyone()
        return summary

    def _rows(self, todo: list[RunTile]) -> Iterator[tuple[TileSum, dict, int, int]]:
        """(tile sums, decoded sample, crop, D4 element) for every row of the run; the sample is valid until the
        next one is read, so everything kept is copied out of it here."""
        by_table: dict[int, list[RunTile]] = {}
        for t in todo:
            by_table.setdefault(id(t.table), []).append(t)
        for group in by_table.values():
            reader = ShardReader(group[0].table, self.reader_manifest, self.access)
            for (_, key, sample, error), rt in zip(reader.read([t.tile for t in group]), group, strict=True):
                if error is not None:
                    raise PredictError(f"tile {tile_id_of(key or rt.key)!r}: {error}")
                meta = dict(sample["meta"])
                if "grids" not in meta:
                    raise PredictError(f"{self.location}: tile {meta['tile_id']!r} has no georeference (shards "
                                       "written before grids were stored): rebuild with maestro-data build")
                ts = TileSum(rt.key, meta, self.transform.repeats * len(self.elements), labels=self._labels(sample))
                for crop in range(self.transform.repeats):
                    for k in self.elements:
                        yield ts, sample, crop, k

    def _labels(self, sample: dict) -> dict[str, np.ndarray]:
        """Training labels of the tile (ignored classes -> missing value), as the trainer's metrics count them."""
        if not self.labelled:
            return {}
        out = {}
        for name, t in self.targets.items():
            if name not in sample:
                continue
            if t.type == "multilabel":
                out[name] = SampleTransform._multilabel(sample[name], t).copy()
            else:
                out[name] = label_table(t, 256)[np.asarray(sample[name], dtype=np.uint8)].astype(np.int64)
        return out

    def _predict(self, todo: list[RunTile]) -> Iterator[TileSum]:
        """Finished tiles, in order, each once all its rows went through the model."""
        spec = self.transform.output_spec()
        size = self.o.batch_size
        buf, rows, pending = BatchBuffer(spec, size, d4_key=True), [], []
        for ts, sample, crop, k in self._rows(todo):
            if not pending or pending[-1] is not ts:
                pending.append(ts)
            buf.fill(len(rows), self.transform, sample, crop, 0, ts.meta["tile_id"])
            buf.arrays["d4"][len(rows)] = k
            rows.append((ts, crop, k))
            if len(rows) == size:
                yield from self._flush(buf, rows, pending)
                buf, rows = BatchBuffer(spec, size, d4_key=True), []
        if rows:
            yield from self._flush(buf, rows, pending)

    def _flush(self, buf: BatchBuffer, rows: list, pending: list[TileSum]) -> Iterator[TileSum]:
        batch = buf.as_dict()
        n = len(rows)
        inputs = to_model_batch({k: v[:n] for k, v in batch.items() if k not in ("tile_id", "valid", "crop_index")},
                                self.reader_manifest, self.device)
        logits = self.model(inputs, "finetune")
        for i, (ts, crop, k) in enumerate(rows):
            for name, t in self.targets.items():
                out = logits[name][i]
                if t.type == "segmentation":
                    out = d4_apply_torch(out, d4_inverse(k)) if k else out
                    ts.add(name, out, self.windows[crop][name], t.tile_size)
                else:
                    ts.add(name, out, None, None)
            ts.received += 1
        while pending and pending[0].done:
            yield pending.pop(0)

    # ------------------------------------------------------------------------------------------ outputs
    def _write_tile(self, ts: TileSum) -> None:
        meta = ts.meta
        grids = georef.grids_from_record(meta["grids"], f"tile {meta['tile_id']!r}")
        record: dict = {"tile_id": meta["tile_id"], "split": meta["split"], "key": ts.key, "targets": {},
                        "rank": self.acc.process_index}
        for name, t in self.targets.items():
            mean = ts.mean(name)
            rec: dict = {}
            if t.type == "segmentation":
                grid = maps.label_grid(grids, name, t.tile_size)
                names = list(t.classes[:t.num_classes])
                classes = mean.argmax(0).to(torch.uint8).cpu().numpy()
                maps.write_class_cog(self.o.out / name / f"{ts.key}.tif", classes, grid, names, self.colors[name])
                if self.o.probabilities:
                    probs = torch.softmax(mean, 0).cpu().numpy()
                    maps.write_probability_cog(self.o.out / f"{name}_probabilities" / f"{ts.key}.tif", probs, grid,
                                               names)
                rec["grid"] = georef.grid_record(grid)
                if name in ts.labels:
                    counter = SegmentationCounts(t.num_classes, t.missing_value, t.ignore)
                    counter.update(mean[None].cpu(), torch.from_numpy(ts.labels[name])[None])
                    rec["confusion"] = counter.counts.tolist()
            else:
                probs = torch.sigmoid(mean).cpu().numpy()
                rec["probabilities"] = [round(float(p), 6) for p in probs]
                rec["footprint"] = maps.footprint_lonlat(maps.union_grid(list(grids.values())))
                if name in ts.labels:
                    counter = MultilabelCounts(t.num_classes, t.missing_value)
                    counter.update(mean[None].cpu(), torch.from_numpy(ts.labels[name])[None])
                    rec["counts"] = counter.counts.tolist()
                    rec["labels"] = ts.labels[name].tolist()
            record["targets"][name] = rec
        maps.write_text_atomic(_record_path(self.o.out, ts.key), json.dumps(record, sort_keys=True))

    def _finish(self, tiles: list[RunTile]) -> dict:
        """Rank 0, after every rank finished: mosaics, classification tables and metrics of the run's tiles."""
        records = []
        for t in tiles:
            path = _record_path(self.o.out, t.key)
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                raise PredictError(f"{path}: record of tile {tile_id_of(t.key)!r} missing or unreadable "
                                   f"({exc})") from None
        outputs, metrics = [], {}
        for name, t in self.targets.items():
            outputs += self._target_outputs(name, t, records)
            metrics.update(self._metrics(name, t, records))
        summary = {"tiles": len(records), "model": self.what, "tta": "d4" if self.o.tta else None,
                   "world_size": self.acc.num_processes,
                   "outputs": [str(p) for p in outputs], "metrics": metrics}
        if metrics:
            maps.write_text_atomic(self.o.out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
        maps.write_text_atomic(self.o.out / "summary.json", json.dumps(summary, indent=2, sort_keys=True))
        return summary

    def _target_outputs(self, name: str, t: TargetSpec, records: list[dict]) -> list[Path]:
        names = list(t.classes[:t.num_classes])
        if t.type == "multilabel":
            recs = [{**r["targets"][name], "tile_id": r["tile_id"], "split": r["split"]} for r in records]
            geo, csv = self.o.out / f"{name}.geojson", self.o.out / f"{name}.csv"
            maps.write_text_atomic(geo, json.dumps(maps.classification_features(recs, names, THRESHOLD)))
            maps.write_text_atomic(csv, maps.classification_csv(recs, names, THRESHOLD))
            return [geo, csv]
        grids = georef.grids_from_record({r["key"]: r["targets"][name]["grid"] for r in records}, "tile records")
        tiles = [maps.VrtTile(f"{name}/{r['key']}.tif", grids[r["key"]]) for r in records]
        out = maps.write_vrts(self.o.out, name, tiles, bands=1, names=names, colors=self.colors[name])
        if self.o.probabilities:
            prob = [maps.VrtTile(f"{name}_probabilities/{r['key']}.tif", v.grid)
                    for r, v in zip(records, tiles, strict=True)]
            out += maps.write_vrts(self.o.out, f"{name}_probabilities", prob, bands=len(names),
                                   band_names=[f"p({n})" for n in names])
        return out

    def _metrics(self, name: str, t: TargetSpec, records: list[dict]) -> dict:
        key = "confusion" if t.type == "segmentation" else "counts"
        counted = [r["targets"][name][key] for r in records if key in r["targets"][name]]
        if not counted:
            return {}
        total = torch.tensor(np.sum(np.asarray(counted, dtype=np.int64), axis=0))
        if t.type == "segmentation":
            scores = SegmentationCounts(t.num_classes, t.missing_value, t.ignore).scores(total)
            c = total.double()
            tp = torch.diag(c)
            iou = (tp / (c.sum(0) + c.sum(1) - tp)).tolist()
            scores["per_class_iou"] = {n: (None if v != v else v) for n, v in zip(t.classes, iou, strict=False)}
        else:
            scores = MultilabelCounts(t.num_classes, t.missing_value).scores(total)
        return {f"{name}/{k}": v for k, v in scores.items()} | {f"{name}/tiles": len(counted)}


def predict(options: PredictOptions, accelerator=None) -> dict:
    """Run the prediction on this process's Accelerator (one is made when none is given); rank 0's summary."""
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    options.out.mkdir(parents=True, exist_ok=True)
    return Predictor(options, accelerator).run()
