"""The per-sample store at scale: hot-path cost, memory per rank, partitioned label issues.

``python -m distnoisy.bench store`` runs three parts on W gloo processes
(``torch.multiprocessing``, no Ray), each printing its figures:

- **hot path**: a batch's get + put (an ELR step's store traffic: read the targets, write the
  targets, the loss, prediction and margin histories and the latest prediction) at N = 1M,
  C = 14, B = 256 (global), with 2 and 4 workers, replicated vs partitioned; as time per step
  and as a fraction of one ResNet-18 32x32 batch-256 CPU step measured in the same run.
  *Blocking* is what the step waits for (a partitioned flush returns at once); *round trip*
  waits for the writes to land too;
- **scale**: C = 1000 float16 targets, partitioned over 4 ranks, at several N and B: bytes per
  rank (measured) and time per step; N = 10M does not fit beside other work on a 24 GiB
  machine, so its bytes per rank are extrapolated from the measured per-partition figures;
- **label issues**: a synthetic run of N samples (loss histories and labels drawn per
  partition, no images), each rank exporting its partition of ``sample_stats/`` and of the
  ranked ``label_issues/`` in parallel, rank 0 writing the indexes and the merged top-k; peak
  memory (max RSS) of every process is recorded beside the size of the whole table;
- **checkpoint**: saving and restoring a partitioned store of N rows (C float16 targets plus the
  run's histories) on W ranks, both ways side by side: *gathered* (the whole store gathered to
  rank 0 and saved in one file, which every rank loads on restore) and *parts* (each rank saves
  and restores its own rows, :mod:`distnoisy.store.parts`); wall time and peak memory per rank,
  and whether the restored store equals the saved one bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from distnoisy.bench.common import DOC_HEADER, machine_info
from distnoisy.core.result_docs import write_section
from distnoisy.store import FieldSpec, make_store

SECTION = "Per-sample store at scale: replicated vs partitioned"
ISSUES_SECTION = "Per-sample store at scale: a partitioned label-issue run"
CKPT_SECTION = "Per-sample store at scale: checkpoints"
CKPT_MODES = ("gathered", "parts")
#: Scores the label-issue count is fitted on (a quantile sketch; the fit is iterative).
FIT_AT_MOST = 1_000_000


@dataclass
class StoreBenchSettings:
    hot_n: int = 1_000_000
    hot_classes: int = 14
    hot_batch: int = 256
    hot_workers: tuple[int, ...] = (2, 4)
    epochs: int = 10
    steps: int = 60
    scale_n: tuple[int, ...] = (250_000, 1_000_000)
    scale_classes: int = 1000
    scale_batch: tuple[int, ...] = (64, 256, 1024)
    scale_workers: int = 4
    issues_n: int = 10_000_000
    issues_classes: int = 100
    issues_workers: int = 4
    top_k: int = 10_000
    ckpt_n: int = 2_000_000
    ckpt_classes: int = 100
    ckpt_workers: int = 4


@dataclass
class StoreBenchReport:
    settings: StoreBenchSettings
    resnet_step_s: float
    hot: list[dict[str, Any]] = field(default_factory=list)
    scale: list[dict[str, Any]] = field(default_factory=list)
    issues: dict[str, Any] = field(default_factory=dict)
    ckpt: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    machine: dict[str, str] = field(default_factory=machine_info)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn: Any, world: int, *args: Any) -> list[dict[str, Any]]:
    """Run ``fn(rank, world, out_dir, *args)`` on ``world`` gloo ranks; each rank's JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, _free_port(), tmp, fn, args), nprocs=world, join=True)
        return [json.loads((Path(tmp) / f"{r}.json").read_text()) for r in range(world)]


def _peak_rss_mb() -> float:
    """This process's peak resident memory (``VmHWM``; unlike ``ru_maxrss`` it is not carried
    over from the parent through the fork and exec of ``spawn``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _entry(rank: int, world: int, port: int, tmp: str, fn: Any, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        base = _peak_rss_mb()  # after the imports, before any data
        result = fn(rank, world, *args)
        result["base_rss_mb"] = base
        result["max_rss_mb"] = _peak_rss_mb()
        (Path(tmp) / f"{rank}.json").write_text(json.dumps(result))
    finally:
        tdist.destroy_process_group()


# -- hot path and scale: timed store steps ----------------------------------------------------
def _elr_specs(classes: int, epochs: int) -> dict[str, FieldSpec]:
    from distnoisy.engine.step import run_field_specs

    specs = run_field_specs(epochs, classes)
    specs["elr_target"] = FieldSpec(shape=(classes,), lowp=True)
    return specs


def _store_steps(
    store: Any,
    n: int,
    batch: int,
    classes: int,
    steps: int,
    rank: int,
    world: int,
    epochs: int,
    round_trip: bool,
) -> float:
    """Median seconds of one ELR step's store traffic (its local share of the batch)."""
    gen = torch.Generator().manual_seed(rank)
    local = batch // world
    times = []
    for step in range(steps + 3):
        index = torch.randint(0, n, (local,), generator=gen)
        values = torch.rand(local, classes, generator=gen)
        t0 = time.perf_counter()
        store.prefetch(index)
        old = store.get("elr_target", index)
        store.stage("elr_target", index, 0.7 * old + 0.3 * values)
        col = step % epochs
        store.stage("loss_hist", index, values[:, 0], column=col)
        store.stage("pred_hist", index, values.argmax(1).to(torch.int16), column=col)
        store.stage("margin_hist", index, values[:, 1], column=col)
        store.stage("train_pred", index, values.argmax(1))
        store.flush()
        if round_trip:
            store.sync()
        if step >= 3:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)
    store.sync()
    return statistics.median(times)


def _hot_worker(rank: int, world: int, s: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    specs = _elr_specs(s["hot_classes"], s["epochs"])
    for backend in ("replicated", "partitioned"):
        store = make_store(s["hot_n"], specs, backend=backend, world_size=world)
        args = (
            store,
            s["hot_n"],
            s["hot_batch"],
            s["hot_classes"],
            s["steps"],
            rank,
            world,
            s["epochs"],
        )
        out[f"{backend}_blocking_s"] = _store_steps(*args, round_trip=False)
        out[f"{backend}_round_trip_s"] = _store_steps(*args, round_trip=True)
        store.close()
        del store
    return out


def _scale_worker(rank: int, world: int, s: dict[str, Any], n: int) -> dict[str, Any]:
    specs = _elr_specs(s["scale_classes"], s["epochs"])
    specs.pop("final_prob")  # written once at the end of a run, not per step
    store = make_store(n, specs, backend="partitioned", dtype="float16", world_size=world)
    lo, hi = store.owned_range()
    out: dict[str, Any] = {
        "rows": hi - lo,
        "bytes": sum(t.numel() * t.element_size() for t in store.parts.values()),
        "target_bytes": store.parts["elr_target"].numel() * 2,
    }
    for b in s["scale_batch"]:
        out[f"step_s_b{b}"] = _store_steps(
            store, n, b, s["scale_classes"], s["steps"] // 2, rank, world, s["epochs"], True
        )
    store.close()
    return out


def _resnet_step_s() -> float:
    """Median seconds of one ResNet-18 (32x32, batch 256, SGD) training step on this CPU."""
    from distnoisy.models import build_model

    torch.manual_seed(0)
    model = build_model("cifar_resnet18", 10, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


# -- checkpoints: gathered to rank 0 vs one part per rank ---------------------------------------
def _filled_store(s: dict[str, Any], world: int, seed: int) -> Any:
    """A partitioned store of ``ckpt_n`` rows whose rows on this rank hold random values."""
    specs = _elr_specs(s["ckpt_classes"], s["epochs"])
    store = make_store(s["ckpt_n"], specs, backend="partitioned", dtype="float16", world_size=world)
    gen = torch.Generator().manual_seed(seed)
    for t in store.parts.values():
        if t.is_floating_point():
            t.copy_(torch.rand(t.shape, generator=gen))
        else:
            t.copy_(torch.randint(-1, 100, t.shape, generator=gen))
    return store


def _ckpt_worker(rank: int, world: int, s: dict[str, Any], mode: str, tmp: str) -> dict[str, Any]:
    from distnoisy.engine.checkpoint import save_atomic
    from distnoisy.store.parts import load_parts, save_part

    directory = Path(tmp) / mode
    directory.mkdir(exist_ok=True)
    store = _filled_store(s, world, seed=rank)
    filled = _peak_rss_mb()
    tdist.barrier()
    t0 = time.perf_counter()
    if mode == "gathered":  # what checkpoints did before per-rank parts
        state = store.state_dict()  # whole on rank 0, {} elsewhere
        if rank == 0:
            save_atomic({"store": state}, directory / "state.pt")
        del state
    else:
        save_part(store, directory, rank)
    tdist.barrier()
    save_s, saved_rss = time.perf_counter() - t0, _peak_rss_mb()
    fresh = make_store(
        s["ckpt_n"], dict(store.specs), backend="partitioned", dtype="float16", world_size=world
    )
    tdist.barrier()
    t0 = time.perf_counter()
    if mode == "gathered":  # every rank reads the one file, keeps its rows
        state = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)
        fresh.load_state_dict(state["store"])
        del state
    else:
        load_parts(fresh, directory, world)
    tdist.barrier()
    load_s = time.perf_counter() - t0
    exact = all(torch.equal(fresh.local(n), store.local(n)) for n in store.specs)
    lo, hi = store.owned_range()
    row = sum(t[:1].numel() * t.element_size() for t in store.parts.values())
    store.close()
    fresh.close()
    return {
        "rows": hi - lo,
        "row_bytes": row,
        "filled_rss_mb": filled,
        "saved_rss_mb": saved_rss,
        "save_s": save_s,
        "load_s": load_s,
        "exact": exact,
    }


# -- label issues: a synthetic partitioned run ------------------------------------------------
def _synthetic_part(lo: int, hi: int, classes: int, epochs: int) -> dict[str, np.ndarray]:
    """Loss and prediction histories of rows ``[lo, hi)``, drawn in chunks of 250,000 rows (so
    that float64 temporaries stay small beside the float16/int16 histories kept)."""
    chunks = [
        _synthetic_chunk(a, min(a + 250_000, hi), classes, epochs) for a in range(lo, hi, 250_000)
    ]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _synthetic_chunk(lo: int, hi: int, classes: int, epochs: int) -> dict[str, np.ndarray]:
    """Rows ``[lo, hi)``: 20% noisy labels, whose loss stays high, clean ones learnt after a
    random epoch (deterministic per row range)."""
    rng = np.random.default_rng(lo)
    n = hi - lo
    given = rng.integers(0, classes, n)
    noisy = rng.random(n) < 0.2
    learnt = rng.integers(0, epochs, n)
    e = np.arange(epochs)[None, :]
    loss = np.where(noisy[:, None], 2.5, np.where(e >= learnt[:, None], 0.1, 2.0))
    loss = (loss + rng.gamma(2.0, 0.25, (n, epochs))).astype(np.float16)
    right = ~noisy[:, None] & (e >= learnt[:, None])
    pred = np.where(right, given[:, None], (given[:, None] + 1) % classes).astype(np.int16)
    return {"given_label": given, "is_corrupted": noisy, "loss_hist": loss, "pred_hist": pred}


def _issues_worker(rank: int, world: int, s: dict[str, Any], out_dir: str) -> dict[str, Any]:
    import pyarrow as pa

    from distnoisy.issues.ranking import flag_cut, flags_from_cut
    from distnoisy.store import history
    from distnoisy.store.export import (
        LABEL_ISSUES_DIR,
        LABEL_ISSUES_TOP,
        SAMPLE_STATS_DIR,
        field_columns,
        rank_part,
        write_index,
        write_part,
        write_top_k,
    )

    t0 = time.perf_counter()
    n, out = s["issues_n"], Path(out_dir)
    per = -(-n // world)
    lo, hi = rank * per, min((rank + 1) * per, n)
    part = _synthetic_part(lo, hi, s["issues_classes"], s["epochs"])
    score = history.mean_loss(part["loss_hist"])
    forgets = history.forgetting_events(part["pred_hist"], part["given_label"])
    # The flag cut needs the score column in one place (8 bytes a sample), never the table.
    scores = [torch.empty(per, dtype=torch.float64) for _ in range(world)] if rank == 0 else None
    padded = torch.from_numpy(np.pad(score, (0, per - len(score)), constant_values=np.nan))
    tdist.gather(padded, scores, dst=0)
    cut_box: list[Any] = [
        flag_cut(torch.cat(scores)[:n].numpy(), fit_at_most=FIT_AT_MOST) if rank == 0 else None
    ]
    del scores
    tdist.broadcast_object_list(cut_box, src=0)
    index = np.arange(lo, hi)
    flags = flags_from_cut(score, index, None, cut_box[0])
    cols = {"index": pa.array(index), "given_label": pa.array(part["given_label"])}
    cols.update(field_columns({k: part[k] for k in ("loss_hist", "pred_hist")}))
    cols.update(score=pa.array(score), forgetting_events=pa.array(forgets))
    stats = pa.table(cols)
    issues = rank_part(
        pa.table(
            {
                "index": index,
                "given_label": part["given_label"],
                "score": score,
                "is_label_issue": flags,
                "is_corrupted": part["is_corrupted"],
            }
        )
    )
    entries = [
        write_part(out / SAMPLE_STATS_DIR, rank, stats, lo),
        write_part(out / LABEL_ISSUES_DIR, rank, issues, lo),
    ]
    gathered: list[Any] = [None] * world
    tdist.all_gather_object(gathered, entries)
    result: dict[str, Any] = {"rows": hi - lo, "table_bytes": stats.nbytes}
    if rank == 0:
        write_index(out / SAMPLE_STATS_DIR, [g[0] for g in gathered], stats.schema)
        write_index(out / LABEL_ISSUES_DIR, [g[1] for g in gathered], issues.schema)
        write_top_k(out / LABEL_ISSUES_DIR, out / LABEL_ISSUES_TOP, s["top_k"])
    tdist.barrier()
    result["wall_s"] = time.perf_counter() - t0
    return result


def _check_issues(out: Path, s: StoreBenchSettings) -> dict[str, Any]:
    """Read the export back part by part: rows, flags, the top-k's precision on the noise."""
    import pyarrow.parquet as pq

    from distnoisy.store.export import LABEL_ISSUES_DIR, LABEL_ISSUES_TOP, iter_parts

    rows = flagged = noisy = 0
    for batch in iter_parts(out / LABEL_ISSUES_DIR, ["is_label_issue", "is_corrupted"]):
        rows += batch.num_rows
        flagged += int(np.asarray(batch.column(0)).sum())
        noisy += int(np.asarray(batch.column(1)).sum())
    top = pq.read_table(out / LABEL_ISSUES_TOP)
    return {
        "rows": rows,
        "flagged": flagged,
        "noisy": noisy,
        "top_k_rows": top.num_rows,
        "top_k_precision": float(np.asarray(top.column("is_corrupted")).mean()),
        "export_mb": sum(f.stat().st_size for f in out.rglob("*.parquet")) / 2**20,
    }


# -- running, printing, the docs section ------------------------------------------------------
def run(s: StoreBenchSettings, parts: tuple[str, ...]) -> StoreBenchReport:
    """Measure the chosen ``parts`` (``hot``, ``scale``, ``issues``, ``checkpoint``)."""
    settings = asdict(s)
    report = StoreBenchReport(s, _resnet_step_s() if "hot" in parts else float("nan"))
    if "hot" in parts:
        for w in s.hot_workers:
            per_rank = _spawn(_hot_worker, w, settings)
            row = {k: max(r[k] for r in per_rank) for k in per_rank[0]}  # the slowest rank
            report.hot.append({"workers": w, **row})
    if "scale" in parts:
        for n in s.scale_n:
            per_rank = _spawn(_scale_worker, s.scale_workers, settings, n)
            row = {k: max(r[k] for r in per_rank) for k in per_rank[0]}
            report.scale.append({"n": n, **row})
    if "issues" in parts:
        with tempfile.TemporaryDirectory(dir=os.environ.get("DISTNOISY_BENCH_TMP")) as tmp:
            per_rank = _spawn(_issues_worker, s.issues_workers, settings, tmp)
            report.issues = {
                "per_rank": per_rank,
                **_check_issues(Path(tmp), s),
            }
    if "checkpoint" in parts:
        for mode in CKPT_MODES:  # each in fresh processes: peak memory is per process
            with tempfile.TemporaryDirectory(dir=os.environ.get("DISTNOISY_BENCH_TMP")) as tmp:
                report.ckpt[mode] = _spawn(_ckpt_worker, s.ckpt_workers, settings, mode, tmp)
    return report


def _hot_lines(r: StoreBenchReport) -> list[str]:
    s = r.settings
    lines = [
        f"Hot path: N = {s.hot_n:,}, C = {s.hot_classes}, global batch {s.hot_batch}, "
        f"{s.epochs}-epoch histories (an ELR step's store traffic), median of {s.steps} steps "
        "on the slowest rank; ResNet-18 step: `cifar_resnet18`, 32x32, batch 256, SGD, one "
        f"thread: **{r.resnet_step_s:.2f} s**.",
        "",
        "| workers | backend | blocking per step (ms) | round trip per step (ms) "
        "| round trip / ResNet-18 step |",
        "|---:|---|---:|---:|---:|",
    ]
    for row in r.hot:
        for b in ("replicated", "partitioned"):
            block, trip = row[f"{b}_blocking_s"], row[f"{b}_round_trip_s"]
            lines.append(
                f"| {row['workers']} | {b} | {block * 1e3:.2f} | {trip * 1e3:.2f} "
                f"| {trip / r.resnet_step_s:.3%} |"
            )
    return lines


def _scale_lines(r: StoreBenchReport) -> list[str]:
    s = r.settings
    lines = [
        "",
        f"Scale: C = {s.scale_classes} float16 targets plus the run's histories "
        f"({s.epochs} epochs), partitioned over {s.scale_workers} ranks; bytes per rank "
        "measured (the largest partition), time per step is the round trip of the slowest rank.",
        "",
        "| N | rows per rank | MB per rank (targets) | MB per rank (all fields) | "
        + " | ".join(f"ms/step B={b}" for b in s.scale_batch)
        + " |",
        "|---:|---:|---:|---:|" + "---:|" * len(s.scale_batch),
    ]
    for row in r.scale:
        steps = " | ".join(f"{row[f'step_s_b{b}'] * 1e3:.2f}" for b in s.scale_batch)
        lines.append(
            f"| {row['n']:,} | {row['rows']:,} | {row['target_bytes'] / 1e6:.0f} "
            f"| {row['bytes'] / 1e6:.0f} | {steps} |"
        )
    if r.scale:
        last = r.scale[-1]
        per_sample = last["bytes"] / last["rows"]
        n10 = 10_000_000
        lines += [
            "",
            f"Extrapolated to N = {n10:,} on {s.scale_workers} ranks (not run: "
            f"{n10 * s.scale_classes * 2 / 1e9:.0f} GB of targets does not fit beside other work "
            f"on this machine): {per_sample:.0f} bytes per sample measured, so "
            f"{n10 / s.scale_workers * per_sample / 1e9:.2f} GB per rank "
            f"(N x C x 2 / W = {n10 * s.scale_classes * 2 / s.scale_workers / 1e9:.2f} GB of "
            "targets); the time per step depends on B, not on N (the rows exchanged per step "
            "are B's).",
        ]
    return lines


def _issues_lines(r: StoreBenchReport) -> list[str]:
    s, i = r.settings, r.issues
    if not i:
        return []
    rss = ", ".join(
        f"{p['max_rss_mb']:.0f} (+{p['max_rss_mb'] - p['base_rss_mb']:.0f})" for p in i["per_rank"]
    )
    table = sum(p["table_bytes"] for p in i["per_rank"]) / 2**20
    return [
        "",
        f"Label issues: a synthetic run of N = {s.issues_n:,} samples ({s.epochs}-epoch float16 "
        f"loss and int16 prediction histories, C = {s.issues_classes}, 20% noisy labels), "
        f"{s.issues_workers} ranks each writing its `sample_stats/` and ranked `label_issues/` "
        f"part, rank 0 the indexes and `label_issues_top.parquet` (k = {s.top_k:,}, merged from "
        "the parts' heads). The flag count is fitted on a "
        f"{FIT_AT_MOST:,}-quantile sketch of the scores (`flag_cut(..., fit_at_most=...)`); "
        "the score column (8 bytes a sample) is the only per-sample data gathered on rank 0.",
        "",
        "| rows | flagged | noisy | top-k precision | whole table in memory (MB) "
        "| peak RSS per process, MB (+ above the process after its imports) "
        "| export on disk (MB) | wall (s) |",
        "|---:|---:|---:|---:|---:|---|---:|---:|",
        f"| {i['rows']:,} | {i['flagged']:,} | {i['noisy']:,} | {i['top_k_precision']:.3f} "
        f"| {table:.0f} | {rss} | {i['export_mb']:.0f} "
        f"| {max(p['wall_s'] for p in i['per_rank']):.1f} |",
    ]


def _ckpt_lines(r: StoreBenchReport) -> list[str]:
    s = r.settings
    first = r.ckpt[CKPT_MODES[0]][0]
    whole_mb = s.ckpt_n * first["row_bytes"] / 2**20
    lines = [
        "",
        f"Checkpoints: a partitioned store of N = {s.ckpt_n:,} rows (C = {s.ckpt_classes} float16 "
        f"ELR targets and probabilities, {s.epochs}-epoch histories: {first['row_bytes']} bytes "
        f"a row, {whole_mb:.0f} MB in all) on {s.ckpt_workers} ranks, saved and restored into a "
        "fresh store. *gathered*: the store gathered to rank 0 and saved as one file, which "
        "every rank loads on restore (checkpoints before per-rank parts); *parts*: each rank "
        "saves its rows and restores the parts that overlap them (memory-mapped). Memory: each "
        "rank's peak RSS growth above its filled partition (the restore's includes the fresh "
        "store's own partition), MB, ranks in order.",
        "",
        "| layout | save (s) | restore (s) | extra peak while saving, MB | extra peak after "
        "restoring, MB | restored bit for bit |",
        "|---|---:|---:|---|---|---|",
    ]
    for mode in CKPT_MODES:
        ranks = r.ckpt[mode]
        save = ", ".join(f"{p['saved_rss_mb'] - p['filled_rss_mb']:.0f}" for p in ranks)
        load = ", ".join(f"{p['max_rss_mb'] - p['filled_rss_mb']:.0f}" for p in ranks)
        lines.append(
            f"| {mode} | {max(p['save_s'] for p in ranks):.2f} "
            f"| {max(p['load_s'] for p in ranks):.2f} | {save} | {load} "
            f"| {'yes' if all(p['exact'] for p in ranks) else 'NO'} |"
        )
    return lines


def render(r: StoreBenchReport, command: str) -> dict[str, str]:
    """``{section title: Markdown}`` of the parts measured."""
    m = r.machine
    head = (
        f"Command: `{command}`. Machine: {m['cpu']}, {m['cpu_count']} cores shared with other "
        f"work, torch {m['torch']}, gloo over loopback, one thread per process."
    )
    out = {}
    if r.hot or r.scale:
        body = [head, "", *(_hot_lines(r) if r.hot else []), *_scale_lines(r)]
        out[SECTION] = "\n".join(body) + "\n"
    if r.issues:
        out[ISSUES_SECTION] = "\n".join([head, *_issues_lines(r)]) + "\n"
    if r.ckpt:
        out[CKPT_SECTION] = "\n".join([head, *_ckpt_lines(r)]) + "\n"
    return out


def add_parser(sub: Any) -> None:
    p = sub.add_parser("store", help="per-sample store: hot path, memory per rank, label issues")
    d = StoreBenchSettings()
    p.add_argument(
        "--parts",
        default="hot,scale,issues,checkpoint",
        help="comma list of hot,scale,issues,checkpoint",
    )
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--hot-n", type=int, default=d.hot_n)
    p.add_argument("--scale-n", default=",".join(map(str, d.scale_n)))
    p.add_argument("--issues-n", type=int, default=d.issues_n)
    p.add_argument("--ckpt-n", type=int, default=d.ckpt_n)
    p.add_argument("--out", type=Path, default=None, help="Markdown file to write the section to")


def main(args: argparse.Namespace, argv: list[str]) -> StoreBenchReport:
    parts = tuple(x for x in args.parts.split(",") if x)
    bad = set(parts) - {"hot", "scale", "issues", "checkpoint"}
    if bad or not parts:
        raise SystemExit(f"--parts takes hot, scale, issues and checkpoint, got {args.parts!r}")
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    settings = StoreBenchSettings(
        steps=args.steps,
        hot_n=args.hot_n,
        scale_n=tuple(int(x) for x in args.scale_n.split(",")),
        issues_n=args.issues_n,
        ckpt_n=args.ckpt_n,
    )
    report = run(settings, parts)
    sections = render(report, "python -m distnoisy.bench store " + " ".join(argv[1:]))
    for title, text in sections.items():
        print(f"## {title}\n\n{text}")
        if args.out is not None:
            write_section(args.out, title, text, header=DOC_HEADER)
    return report
