"""clients.torch and clients.dask against a real server: sharding, shuffling, zero copy, dask."""

from __future__ import annotations

import collections

import numpy as np
import pandas as pd
import pytest
import torch
import torch.utils.data
from distributed import Client as DaskClient
from distributed import LocalCluster
from torch.utils.data import DataLoader

from clients.convert import is_tensor
from clients.dask import read_dask
from clients.torch import FlightDataset, batch_to_torch
from tests.helpers import LCLS2_EXP, admin_token

RUNS = [7, 8]
COLUMNS = ["run", "timestamp", "gmd/energy", "pnccd/image"]


def events_by_id(client) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    table = client.read(LCLS2_EXP, RUNS, COLUMNS)
    frame = {c: np.asarray(client_col) for c, client_col in zip(
        COLUMNS[:3], (table.column(c).to_numpy() for c in COLUMNS[:3]), strict=True)}
    images = np.concatenate([c.storage.flatten().to_numpy().reshape(len(c), 1, 128, 128)
                             for c in table.column("pnccd/image").chunks])
    return {(int(r), int(t)): {"gmd/energy": e, "pnccd/image": img}
            for r, t, e, img in zip(frame["run"], frame["timestamp"], frame["gmd/energy"],
                                    images, strict=True)}


class Tagged(torch.utils.data.IterableDataset):
    """Several datasets read in turn by the same DataLoader workers, each batch tagged with
    (dataset key, worker): one pool of workers serves every simulated rank (spawning is slow)."""

    def __init__(self, datasets: dict[tuple, FlightDataset]) -> None:
        self.datasets = datasets

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        for key, ds in self.datasets.items():
            for batch in ds:
                yield (*key, worker.id), batch


def test_each_event_once_across_ranks_and_workers(client, location) -> None:
    """2 ranks x 2 DataLoader workers: with 7 endpoints, each shard reads its own endpoints;
    scalar columns alone plan 2 endpoints, fewer than shards, so events are dealt by index."""
    sets = {"endpoints": COLUMNS, "events": COLUMNS[:3]}
    assert len(client.plan(LCLS2_EXP, RUNS, sets["endpoints"]).endpoints) >= 4
    assert len(client.plan(LCLS2_EXP, RUNS, sets["events"]).endpoints) < 4
    datasets = {(name, rank): FlightDataset(location, LCLS2_EXP, RUNS, columns, rank=rank,
                                            world_size=2, batch_size=8)
                for name, columns in sets.items() for rank in (0, 1)}
    # spawn: a forked child must not reuse the parent's gRPC state (the in-process server)
    loader = DataLoader(Tagged(datasets), batch_size=None, num_workers=2,
                        multiprocessing_context="spawn")
    got: dict[str, list] = collections.defaultdict(list)
    for (name, rank, worker), batch in loader:
        got[name].extend(((rank, worker), {k: v[i] for k, v in batch.items()})
                         for i in range(len(batch["run"])))
    expected = events_by_id(client)
    for name in sets:
        ids = [(int(e["run"]), int(e["timestamp"])) for _, e in got[name]]
        assert collections.Counter(ids) == dict.fromkeys(expected, 1), name  # each just once
        shares = collections.defaultdict(set)
        for pair, event in got[name]:
            shares[pair].add((int(event["run"]), int(event["timestamp"])))
            want = expected[(int(event["run"]), int(event["timestamp"]))]
            np.testing.assert_array_equal(event["gmd/energy"].numpy(), want["gmd/energy"])
            if "pnccd/image" in event:
                assert event["pnccd/image"].dtype == torch.uint16
                np.testing.assert_array_equal(event["pnccd/image"].numpy(), want["pnccd/image"])
        assert set(shares) == {(0, 0), (0, 1), (1, 0), (1, 1)}, name  # no (rank, worker) idle


def ids_of(ds: FlightDataset) -> list[tuple[int, int]]:
    return [(int(e["run"]), int(e["timestamp"])) for e in ds]


def test_shuffle_is_a_reproducible_permutation(location) -> None:
    def dataset(**kw) -> FlightDataset:
        return FlightDataset(location, LCLS2_EXP, RUNS, ["run", "timestamp", "pnccd/image"],
                             rank=0, world_size=1, **kw)

    plain = ids_of(dataset())
    assert len(plain) == 210
    shuffled = dataset(shuffle_buffer=32, seed=3)
    first = ids_of(shuffled)
    assert first != plain and sorted(first) == sorted(plain)
    assert ids_of(shuffled) == first  # same seed and epoch: same order
    assert ids_of(dataset(shuffle_buffer=32, seed=3)) == first
    shuffled.set_epoch(1)
    second = ids_of(shuffled)
    assert second != first and sorted(second) == sorted(plain)
    # shuffled batches: stacked events, still every event once
    batches = list(dataset(shuffle_buffer=32, seed=3, batch_size=16))
    assert [len(b["run"]) for b in batches] == [16] * 13 + [2]
    assert batches[0]["pnccd/image"].shape == (16, 1, 128, 128)
    ids = [(int(r), int(t)) for b in batches for r, t in zip(b["run"], b["timestamp"],
                                                             strict=True)]
    assert sorted(ids) == sorted(plain)


def test_ragged_columns_batch_as_lists(client, location) -> None:
    columns = ["run", "timestamp", "peaks/var_x"]
    expected = client.read(LCLS2_EXP, RUNS, columns).to_pylist()
    by_id = {(r["run"], r["timestamp"]): r["peaks/var_x"] for r in expected}
    for shuffle in (0, 32):
        batches = list(FlightDataset(location, LCLS2_EXP, RUNS, columns, rank=0, world_size=1,
                                     shuffle_buffer=shuffle, batch_size=16))
        peaks = [p for b in batches for p in b["peaks/var_x"]]
        ids = [(int(r), int(t)) for b in batches for r, t in zip(b["run"], b["timestamp"],
                                                                 strict=True)]
        assert isinstance(batches[0]["peaks/var_x"], list) and len(peaks) == len(by_id)
        for key, values in zip(ids, peaks, strict=True):
            assert values.tolist() == pytest.approx(by_id[key])


def test_tensors_are_views_of_arrow_buffers(client, location, recwarn) -> None:
    batch = next(iter(client.stream(LCLS2_EXP, 7, ["timestamp", "pnccd/image"])))
    tensors = batch_to_torch(batch)
    for name, tensor in tensors.items():
        column = batch.column(name)
        flat = column.storage.flatten() if is_tensor(column.type) else column
        data = flat.buffers()[1]
        start = data.address + flat.offset * tensor.element_size()
        assert tensor.data_ptr() == start
        assert start + tensor.nbytes <= data.address + data.size
    # events and batches the dataset yields are views into one tensor per received batch
    ds = FlightDataset(location, LCLS2_EXP, 7, ["pnccd/image"], rank=0, world_size=1)
    # the server's first batch is small (one event); the second holds several
    events = [e["pnccd/image"] for _, e in zip(range(3), ds, strict=False)]
    first, second = events[1:]
    assert second.data_ptr() - first.data_ptr() == first.nbytes
    assert second.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
    ds = FlightDataset(location, LCLS2_EXP, 7, ["pnccd/image"], rank=0, world_size=1,
                       batch_size=2)
    straddling, pair = [b["pnccd/image"] for _, b in zip(range(2), ds, strict=False)]
    assert straddling.untyped_storage().nbytes() == straddling.nbytes  # joined: one copy
    assert pair.untyped_storage().nbytes() > pair.nbytes  # a slice of the batch, not a copy
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_read_dask_on_a_local_cluster(client, location) -> None:
    token = admin_token()
    columns = ["run", "timestamp", "gmd/energy", "evr/code_40"]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, DaskClient(cluster):
        df = read_dask(location, LCLS2_EXP, RUNS, columns, token=token)
        assert df.npartitions == len(client.plan(LCLS2_EXP, RUNS, columns).endpoints)
        got = df.compute().reset_index(drop=True)
        want = client.read(LCLS2_EXP, RUNS, columns).to_pandas()
        pd.testing.assert_frame_equal(got, want)

        shape = {"filter": "gmd/energy > 0.5",
                 "processing": [{"step": "roi", "column": "pnccd/image", "y": [0, 64],
                                 "x": [0, 32]}]}
        cols = ["run", "timestamp", "gmd/energy", "pnccd/image"]
        df = read_dask(location, LCLS2_EXP, RUNS, cols, token=token, **shape)
        assert df.npartitions == len(client.plan(LCLS2_EXP, RUNS, cols, **shape).endpoints) > 1
        assert df.dtypes["pnccd/image"] == np.dtype(object)
        got = df.compute().reset_index(drop=True)
        want = client.read(LCLS2_EXP, RUNS, cols, **shape)
        assert 0 < len(got) == want.num_rows < 210
        assert (got["gmd/energy"] > 0.5).all()
        np.testing.assert_array_equal(got["timestamp"], want.column("timestamp").to_numpy())
        assert got["pnccd/image"].iloc[0].shape == (1, 64, 32)
        images = np.stack(list(got["pnccd/image"]))
        expected = np.concatenate([c.storage.flatten().to_numpy().reshape(len(c), 1, 64, 32)
                                   for c in want.column("pnccd/image").chunks])
        np.testing.assert_array_equal(images, expected)
