"""kernel_matrix: the kernel of a dataset in tiles on disk — equal to ntk(), resumable after a kill, refusing
another model's file, verified in float64."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import ntk_bench
from ntk_bench.bench.execution import kernel_matrix as km
from ntk_bench.bench.execution import tiles
from ntk_bench.bench.store.kernel_store import KernelFileError

FACTORIES = '''
import time
import torch

class Slow(torch.nn.Module):
    """A tiny MLP whose forward takes a while, so that a run can be killed between tiles."""
    def __init__(self, delay):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        self.delay = delay
    def forward(self, x):
        if self.delay:
            time.sleep(self.delay)
        return self.net(x)

def model():
    torch.manual_seed(0)
    return Slow(0.0)

def slow_model():
    torch.manual_seed(0)
    return Slow(0.02)

def small_data():
    return torch.randn(24, 5, generator=torch.Generator().manual_seed(1))

def other_model():
    torch.manual_seed(1)
    return Slow(0.0)

def data():
    return torch.randn(41, 5, generator=torch.Generator().manual_seed(1))

class Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 41
    def __getitem__(self, k):
        return data()[k], k % 3

def pairs():
    return Pairs()
'''


@pytest.fixture(scope="module")
def factories(tmp_path_factory):
    path = tmp_path_factory.mktemp("factories") / "facts.py"
    path.write_text(FACTORIES)
    return path


def _load(factories, fn):
    from ntk_bench.bench.zoo.architectures import load_callable

    return load_callable(f"{factories}:{fn}")()


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "ntk_bench", "kernel", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("mode", ["full", "trace", "diagonal"])
def test_equals_ntk_in_every_mode(tmp_path, factories, mode):
    model, x = _load(factories, "model"), _load(factories, "data")
    before = [p.detach().clone() for p in model.parameters()]
    k = ntk_bench.kernel_matrix(model, x, mode=mode, out=tmp_path / "K.zarr", tile=9, progress=False,
                                dtype="float64")
    # the caller's model is left as found (weights and dtype), whatever the kernel's dtype
    after = list(model.parameters())
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(before, after, strict=True))
    ref = ntk_bench.ntk(model.double(), x.double(), mode=mode).numpy()
    got = np.asarray(k)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
    # the lower triangle is mirrored on read, reads across tiles and fancy indexing agree with the full array
    np.testing.assert_array_equal(k[30:, :12], got[30:, :12])
    np.testing.assert_array_equal(k[np.array([40, 2, 17])][:, 5], got[[40, 2, 17]][:, 5])
    assert k.attrs["symmetric"] and len(list((tmp_path / "K.zarr" / "tiles").iterdir())) == 15  # 5 x 5 upper
    assert k.attrs["verification"]["ok"] and len(k.attrs["verification"]["tiles"]) == 4


def test_x2_dataset_of_pairs_and_numpy(tmp_path, factories):
    model = _load(factories, "model")
    x1 = _load(factories, "pairs")  # a Dataset of (input, target)
    x2 = _load(factories, "data")[:13].numpy()
    k = ntk_bench.kernel_matrix(model, x1, x2, mode="full", out=tmp_path / "K.zarr", tile=6, progress=False)
    ref = ntk_bench.ntk(model, _load(factories, "data"), torch.from_numpy(x2), mode="full").numpy()
    np.testing.assert_allclose(np.asarray(k), ref, rtol=1e-5, atol=1e-6)
    assert not k.attrs["symmetric"] and k.shape == (41, 13, 3, 3)


def test_caller_model_left_as_found(tmp_path, factories):
    model = _load(factories, "model")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ntk_bench.kernel_matrix(model, _load(factories, "data"), out=tmp_path / "K.zarr", tile=20, dtype="float64",
                            progress=False, verify=0)
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_refuses_another_models_file_listing_what_differs(tmp_path, factories):
    x = _load(factories, "data")
    ntk_bench.kernel_matrix(_load(factories, "model"), x, out=tmp_path / "K.zarr", tile=20, progress=False, verify=0)
    with pytest.raises(KernelFileError, match="model_fingerprint"):
        ntk_bench.kernel_matrix(_load(factories, "other_model"), x, out=tmp_path / "K.zarr", progress=False)
    with pytest.raises(KernelFileError, match="mode"):
        ntk_bench.kernel_matrix(_load(factories, "model"), x, mode="full", out=tmp_path / "K.zarr", progress=False)
    with pytest.raises(KernelFileError, match="inputs_fingerprint"):
        ntk_bench.kernel_matrix(_load(factories, "model"), x + 1, out=tmp_path / "K.zarr", progress=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(KernelFileError, match="not an ntk-bench kernel"):
        ntk_bench.kernel_matrix(_load(factories, "model"), x, out=tmp_path / "notes", progress=False)
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine"


def test_a_wrong_tile_fails_verification(tmp_path, factories, monkeypatch):
    from ntk_bench.bench.store.kernel_store import KernelArray

    model, x = _load(factories, "model"), _load(factories, "data")
    real = KernelArray.write_tile

    def wrong(self, i, j, block, **kw):
        real(self, i, j, block * 1.01 if i == j else block, **kw)  # every diagonal tile 1% off

    monkeypatch.setattr(KernelArray, "write_tile", wrong)
    with pytest.raises(km.KernelVerificationError, match=r"tile \[0, 0\]"):
        ntk_bench.kernel_matrix(model, x, out=tmp_path / "K.zarr", tile=10, progress=False)


def test_out_of_memory_tile_is_split(tmp_path, factories, monkeypatch):
    model, x = _load(factories, "model"), _load(factories, "data")
    real, sizes = tiles._block, []

    def small_only(plugin, model, xa, xb, mode, device, dtype):
        sizes.append(xa.shape[0])
        if xa.shape[0] > 5:
            raise torch.OutOfMemoryError("injected")
        return real(plugin, model, xa, xb, mode, device, dtype)

    monkeypatch.setattr(tiles, "_block", small_only)
    k = ntk_bench.kernel_matrix(model, x, mode="full", out=tmp_path / "K.zarr", tile=20, progress=False,
                                dtype="float64", verify=1, impl="jacobian_contraction")
    ref = ntk_bench.ntk(model.double(), x.double(), mode="full").numpy()
    np.testing.assert_allclose(np.asarray(k), ref, rtol=1e-10, atol=1e-12)
    assert max(s for s in sizes if s <= 5) == 5 and 20 in sizes


def test_structured_factors_reused_and_out_of_memory_falls_back_to_whole_tiles(tmp_path, factories, monkeypatch):
    from ntk_bench.implementations.structured import Structured

    model, x = _load(factories, "model"), _load(factories, "data")
    real, blocks = Structured.factors, []

    def counted(self, model, xb):
        blocks.append(xb.shape[0])
        if len(blocks) == 4:
            raise torch.OutOfMemoryError("injected")
        return real(self, model, xb)

    monkeypatch.setattr(Structured, "factors", counted)
    k = ntk_bench.kernel_matrix(model, x, mode="full", out=tmp_path / "K.zarr", tile=10, progress=False,
                                dtype="float64", verify=0, impl="structured")
    ref = ntk_bench.ntk(model.double(), x.double(), mode="full").numpy()
    np.testing.assert_allclose(np.asarray(k), ref, rtol=1e-10, atol=1e-12)
    # 5 row blocks: each recorded once as a row and at most once as a column (kept for later bands), not per tile
    assert len(blocks) <= 2 * 5 + 1 < len(k.tiles()) + 5
    runs = k.attrs["timings"]["runs"][-1]
    assert runs["factors_s"] > 0 and runs["contract_s"] > 0 and runs["whole_tiles_s"] > 0  # the injected fallback


@pytest.mark.parametrize("estimate_counts_factors", [True, False])
def test_kept_factors_plus_the_tiles_peak_stay_within_the_budget_and_are_let_go_after_the_call(
        tmp_path, monkeypatch, estimate_counts_factors):
    """A conv net's factors keep their tensors in the rules' slots: they must be counted (else every column block
    is kept, whatever the budget). The column blocks kept, and the one being recorded, fit what the budget leaves
    beside a tile's peak: the plugin's estimate of a tile, or, where the estimate counts less (injected: no
    estimate at all), both blocks' factors as recorded. Nothing is kept once the call returns."""
    from ntk_bench import implementations
    from ntk_bench.bench.zoo import architectures
    from ntk_bench.implementations.core import engine
    from ntk_bench.implementations.core.costs import cost_stats
    from ntk_bench.implementations.structured.plugin import Structured

    torch.manual_seed(0)
    model, shape = architectures.cnn(channels=4, image=8)
    x = torch.randn(48, *shape, generator=torch.Generator().manual_seed(2))
    plugin = implementations.get("structured")
    call = engine.validated(plugin, model, x[:8], None, "trace")
    with engine.running(model):
        f = plugin.factors(call.net, call.x1)
    held = sum(t.numel() * t.element_size() for item in f.items if item is not None
               for name in getattr(type(item), "__slots__", ()) if isinstance(t := getattr(item, name, None),
                                                                            torch.Tensor))
    assert held > 0 and f.nbytes() >= held
    block = f.nbytes()
    estimate = plugin.estimate(cost_stats(model, x[:1]), 8, 8, "trace", False).bytes
    if estimate_counts_factors:
        assert estimate >= 2 * block  # (else this case would not test the estimate's share)
        tile_peak = estimate
    else:
        monkeypatch.setattr(km, "_tile_peak", lambda *a, **k: 0)  # an estimate that counts nothing
        tile_peak = 2 * block
    budget = tile_peak + 5 * block // 2  # room for two column blocks of 8 beside a tile, not the five later ones
    caps, kept, recording, column = [], [], [], [False]
    real_cap, real_put, real_factors, real_contracted = (tiles._cache_cap, tiles._FactorCache.put, Structured.factors,
                                                         tiles._contracted)

    def cache_cap(spec, fa):
        caps.append(real_cap(spec, fa))
        return caps[-1]

    def put(self, j, factors, cap):
        real_put(self, j, factors, cap)
        kept.append((len(self.blocks), self.bytes, cap))

    def factors(self, model, x):
        before = tiles._CACHE.bytes
        out = real_factors(self, model, x)
        if column[0]:
            recording.append(before + out.nbytes())  # kept while this column block was being recorded
        return out

    def contracted(*args):
        column[0] = True
        try:
            return real_contracted(*args)
        finally:
            column[0] = False

    monkeypatch.setattr(tiles, "_cache_cap", cache_cap)
    monkeypatch.setattr(tiles, "_overhead", lambda spec, fa: 0)  # (what else the process holds: the next test)
    monkeypatch.setattr(tiles._FactorCache, "put", put)
    monkeypatch.setattr(Structured, "factors", factors)
    monkeypatch.setattr(tiles, "_contracted", contracted)
    k = ntk_bench.kernel_matrix(model, x, mode="trace", out=tmp_path / "K.zarr", tile=8, progress=False,
                                verify=-1, impl="structured", memory_budget_bytes=budget)
    assert caps and set(caps) == {budget - tile_peak}
    assert kept and max(n for n, _, _ in kept) == 2 and all(b <= cap for _, b, cap in kept)
    assert recording and all(r <= budget - tile_peak for r in recording)
    assert not tiles._CACHE.blocks and tiles._CACHE.bytes == 0
    ref = ntk_bench.ntk(model, x, mode="trace", impl="structured").numpy()
    np.testing.assert_allclose(np.asarray(k), ref, rtol=1e-5, atol=1e-6)


def test_what_the_process_holds_beyond_the_factors_leaves_less_for_kept_blocks(monkeypatch):
    """Resident memory the factors do not account for (the plan, the allocator's freed pools: injected here) is
    taken from the kept blocks' cap, so that the kept blocks plus a tile stay within the budget."""

    class F:
        n = 8

        def nbytes(self):
            return 100

    spec = {"out": "K", "memory_budget_bytes": 10_000, "tile_peak_bytes": 1_000, "rss_baseline": 50_000}
    monkeypatch.setattr(tiles._CACHE, "bytes", 300)
    monkeypatch.setattr(tiles, "_rss", lambda: 50_000 + 300 + 100)  # the kept blocks and the row block: no more
    assert tiles._cache_cap(spec, F()) == 10_000 - 1_000
    monkeypatch.setattr(tiles, "_rss", lambda: 50_000 + 300 + 100 + 2_500)  # 2500 bytes more
    assert tiles._cache_cap(spec, F()) == 10_000 - 1_000 - 2_500
    monkeypatch.setattr(tiles, "_rss", lambda: 50_000 + 20_000)
    assert tiles._cache_cap(spec, F()) == 0


def test_bad_arguments_are_one_clear_error(tmp_path, factories):
    model, x = _load(factories, "model"), _load(factories, "data")
    with pytest.raises(ValueError, match="out"):
        ntk_bench.kernel_matrix(model, x)
    with pytest.raises(ValueError, match="mode"):
        ntk_bench.kernel_matrix(model, x, mode="diag", out=tmp_path / "K")
    with pytest.raises(ValueError, match="factories"):
        ntk_bench.kernel_matrix(model, x, out=tmp_path / "K", executor="local")
    with pytest.raises(TypeError, match="Dataset"):
        ntk_bench.kernel_matrix(model, 3.0, out=tmp_path / "K")


def test_each_tile_record_carries_its_seconds_and_cpu_seconds(tmp_path, factories):
    """The records say what each finished tile cost (the work a kill loses is read from them); an older,
    empty record still counts as finished."""
    model, x = _load(factories, "slow_model"), _load(factories, "small_data")
    k = ntk_bench.kernel_matrix(model, x, mode="trace", out=tmp_path / "K.zarr", tile=8, progress=False, verify=-1)
    infos = {t: k.tile_info(*t) for t in k.tiles()}
    assert len(infos) == 6
    for (i, j), info in infos.items():
        assert info["seconds"] > 0 and info["cpu_s"] >= 0 and info["pid"] == os.getpid(), ((i, j), info)
        assert info["process_cpu_s"] >= info["cpu_s"]
        if i == j == 0:  # a band's first tile counts its row's factors (recorded, not read back, in the first
            # band): the slow forward sleeps 20 ms a call
            assert info["seconds"] >= 0.02, ((i, j), info)
    assert k.tile_info(0, 0)["at"] <= k.tile_info(0, 2)["at"]
    (tmp_path / "K.zarr" / "tiles" / "1-2").write_text("")
    assert k.tile_info(1, 2) == {} and k.done(1, 2)
    (tmp_path / "K.zarr" / "tiles" / "1-2").unlink()
    assert k.tile_info(1, 2) is None and k.missing() == [(1, 2)]


def _tiles(path):
    """The finished tiles' records (``I-J``), not a killed writer's leftover temporary file (``.I-J.*``)."""
    return {p.name: p.stat().st_mtime_ns for p in (path / "tiles").iterdir() if re.fullmatch(r"\d+-\d+", p.name)}


def test_sigkill_then_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path, factories):
    args = ["--model", f"{factories}:slow_model", "--data", f"{factories}:small_data", "--tile", "4", "--verify", "0"]
    whole = _cli(*args, "--out", tmp_path / "whole.zarr")
    killed = _cli(*args, "--out", tmp_path / "K.zarr")
    deadline = time.time() + 120
    while time.time() < deadline:
        done = len(_tiles(tmp_path / "K.zarr")) if (tmp_path / "K.zarr" / "tiles").is_dir() else 0
        if done >= 3:
            break
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(30)
    assert whole.wait(300) == 0, whole.stderr.read()
    before = _tiles(tmp_path / "K.zarr")
    assert 3 <= len(before) < 21
    resumed = _cli(*args, "--out", tmp_path / "K.zarr")
    assert resumed.wait(300) == 0, resumed.stderr.read()
    after = _tiles(tmp_path / "K.zarr")
    assert len(after) == 21 and all(after[t] == m for t, m in before.items())  # finished tiles not computed again
    a, b = ntk_bench.open_kernel(tmp_path / "K.zarr"), ntk_bench.open_kernel(tmp_path / "whole.zarr")
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_local_workers_equal_this_process_and_survive_a_killed_worker(tmp_path, factories):
    import psutil

    args = ["--model", f"{factories}:slow_model", "--data", f"{factories}:small_data", "--tile", "4", "--verify", "0"]
    here = _cli(*args, "--out", tmp_path / "here.zarr")
    run = _cli(*args, "--out", tmp_path / "K.zarr", "--executor", "local", "--workers", "2")
    deadline, victim = time.time() + 180, None
    while time.time() < deadline and victim is None:
        tiles = tmp_path / "K.zarr" / "tiles"
        if tiles.is_dir() and len(list(tiles.glob("*-*"))) >= 2:
            workers = [p for p in psutil.Process(run.pid).children(recursive=True) if "worker" in " ".join(p.cmdline())]
            victim = workers[0] if workers else None
        time.sleep(0.05)
    assert victim is not None, "no worker seen"
    victim.kill()
    assert run.wait(300) == 0, run.stderr.read()
    assert here.wait(300) == 0, here.stderr.read()
    a, b = ntk_bench.open_kernel(tmp_path / "K.zarr"), ntk_bench.open_kernel(tmp_path / "here.zarr")
    assert a.complete and np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.ray
def test_ray_with_a_worker_killed_mid_kernel_equals_the_local_kernel(tmp_path, factories):
    """A real two-CPU Ray cluster on this machine; a Ray worker is SIGKILLed while it computes a row band: the
    band is retried and the kernel equals the one computed in this process."""
    pytest.importorskip("ray")
    import threading

    from ntk_bench.bench.execution.executors.ray_executor import RayExecutor
    from tests.bench.execution.test_executors import _kill_a_ray_worker_under_a_task

    ex = RayExecutor(tmp_path / "ray", init_kwargs={"address": "local", "num_cpus": 2,
                                                    "object_store_memory": 100 * 2**20, "include_dashboard": False,
                                                    "_node_ip_address": "127.0.0.1"})
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_ray_worker_under_a_task, args=(stop, killed), daemon=True)
    killer.start()
    try:
        k = ntk_bench.kernel_matrix(f"{factories}:slow_model", f"{factories}:small_data", out=tmp_path / "K.zarr",
                                    tile=4, executor=ex, verify=0, progress=False)
    finally:
        stop.set()
        killer.join()
        ex.close()
        import ray

        ray.shutdown()
    assert killed, "no Ray worker was killed: the test did not inject its fault"
    here = ntk_bench.kernel_matrix(_load(factories, "slow_model"), _load(factories, "small_data"),
                                   out=tmp_path / "here.zarr", tile=4, verify=0, progress=False)
    assert k.complete and np.array_equal(np.asarray(k), np.asarray(here))


class _Killed(BaseException):
    """What a SIGKILL leaves: the run stops between two tiles, nothing after it runs."""


@pytest.mark.parametrize("impl", ["structured", "explicit_mlp"])
@pytest.mark.parametrize("on_disk", [True, False])
def test_a_killed_run_resumes_reading_the_blocks_factors_it_kept_on_disk(tmp_path, monkeypatch, on_disk, impl):
    """Each block's factors, once recorded, are written beside the kernel; a resumed run reads them back instead
    of recording them again (counted on the plugin's calls and in the run's record), and its kernel equals an
    uninterrupted run's bit for bit. Off (0 bytes of disk), the resumed run records the blocks again. Once the
    kernel is complete the factors are deleted. For both plugins that keep factors: structured (a CNN) and
    explicit_mlp (an MLP, its layer inputs and output gradients)."""
    from ntk_bench import implementations
    from ntk_bench.bench.store.kernel_store import KernelArray
    from ntk_bench.bench.zoo import architectures

    torch.manual_seed(0)
    model, shape = architectures.cnn(channels=4, image=8) if impl == "structured" else \
        architectures.mlp(in_features=6, width=16, depth=2, out=3)
    x = torch.randn(40, *shape, generator=torch.Generator().manual_seed(3))
    disk = None if on_disk else 0
    kw = dict(mode="trace", tile=8, progress=False, verify=-1, impl=impl, factors_disk_bytes=disk)
    cls = type(implementations.get(impl))
    recorded, real = [], cls.factors

    def counted(self, model, xb):
        recorded.append(xb.shape[0])
        return real(self, model, xb)

    monkeypatch.setattr(cls, "factors", counted)
    # (oneDNN on or off is timed per new kernel: fixed, so that both kernels run the same convolutions)
    monkeypatch.setattr(km, "_choose_onednn", lambda *a: True)
    whole = ntk_bench.kernel_matrix(model, x, out=tmp_path / "whole.zarr", **kw)
    if on_disk:  # 5 blocks: each recorded once, read back as a later band's row, not recorded again
        assert len(recorded) == 5 and whole.attrs["timings"]["runs"][-1]["blocks_recorded"] == 5
        recorded_only = ntk_bench.kernel_matrix(model, x, out=tmp_path / "none.zarr", **dict(kw, factors_disk_bytes=0))
        assert np.array_equal(np.asarray(recorded_only), np.asarray(whole))  # read back = recorded, bit for bit
    assert not (tmp_path / "whole.zarr" / "factors").exists()

    real_write, written = KernelArray.write_tile, []

    def dies_after_seven(self, i, j, block, info=None):
        if len(written) == 7:  # band 0's five tiles and two of band 1's
            raise _Killed()
        real_write(self, i, j, block, info)
        written.append((i, j))

    monkeypatch.setattr(KernelArray, "write_tile", dies_after_seven)
    with pytest.raises(_Killed):
        ntk_bench.kernel_matrix(model, x, out=tmp_path / "K.zarr", **kw)
    monkeypatch.setattr(KernelArray, "write_tile", real_write)
    kept = sorted(p.name for p in (tmp_path / "K.zarr" / "factors").glob("*.pt")) if on_disk else []
    if on_disk:  # block 0's tiles are all done: deleted; the others are needed by the bands left
        assert kept == ["x1-1.pt", "x1-2.pt", "x1-3.pt", "x1-4.pt"]
    recorded.clear()
    k = ntk_bench.kernel_matrix(model, x, out=tmp_path / "K.zarr", **kw)
    run = k.attrs["timings"]["runs"][-1]
    assert run["tiles"] == 15 - 7
    if on_disk:
        assert recorded == [] and run["blocks_recorded"] == 0 and run["blocks_read"] >= 4
    else:
        assert len(recorded) >= 4 and run["blocks_recorded"] == len(recorded)
    assert np.array_equal(np.asarray(k), np.asarray(whole))
    assert not (tmp_path / "K.zarr" / "factors").exists()


def test_factors_on_disk_under_another_key_or_past_the_budget_are_not_used(tmp_path):
    from ntk_bench.bench.execution.factor_store import FactorStore

    a = FactorStore(tmp_path, "key-a", 1 << 20)
    state = {"items": [torch.arange(6.0).reshape(2, 3)[:, 1:]], "n": 2}
    assert a.save("x1", 0, state, 100)
    back = a.load("x1", 0)
    assert torch.equal(back["items"][0], state["items"][0]) and back["items"][0].stride() == (3, 1)
    assert FactorStore(tmp_path, "key-b", 1 << 20).load("x1", 0) is None  # another model, data, code, ...
    assert a.load("x1", 1) is None
    small = FactorStore(tmp_path, "key-a", a.used() + 10)
    assert not small.save("x1", 1, state, 100) and not (tmp_path / "factors" / "x1-1.pt").exists()
    assert not FactorStore(tmp_path, "key-a", 0).save("x1", 2, state, 1)
    (tmp_path / "factors" / "x1-0.pt").write_bytes(b"torn")
    assert a.load("x1", 0) is None and not (tmp_path / "factors" / "x1-0.pt").exists()


def test_a_disk_budget_too_small_for_the_factors_is_said_and_counted(tmp_path):
    """Blocks the factors' disk budget cannot take are counted (``blocks_not_kept``) and the call warns, naming
    the option that raises it; a budget that takes them all, or none asked for (0), says nothing."""
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(3))
    kw = dict(mode="trace", tile=8, progress=False, verify=-1, impl="explicit_mlp")
    with pytest.warns(UserWarning, match=r"blocks' factors did not fit .* --factors-disk GIB"):
        small = ntk_bench.kernel_matrix(model, x, out=tmp_path / "small.zarr", factors_disk_bytes=3000, **kw)
    run = small.attrs["timings"]["runs"][-1]
    assert run["blocks_not_kept"] >= 1 and run.get("blocks_written", 0) + run["blocks_not_kept"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, disk in (("roomy.zarr", 1 << 30), ("none.zarr", 0)):
            k = ntk_bench.kernel_matrix(model, x, out=tmp_path / name, factors_disk_bytes=disk, **kw)
            assert "blocks_not_kept" not in k.attrs["timings"]["runs"][-1]
            assert np.array_equal(np.asarray(k), np.asarray(small))


def test_the_command_keeps_the_factors_on_disk_or_writes_none(tmp_path, factories):
    from ntk_bench.bench.cli import main

    args = ["kernel", "--model", f"{factories}:model", "--data", f"{factories}:small_data", "--impl", "structured",
            "--tile", "8", "--verify", "-1", "--no-progress", "-q"]
    assert main([*args, "--out", str(tmp_path / "kept.zarr"), "--keep-factors"]) == 0
    assert sorted(p.name for p in (tmp_path / "kept.zarr" / "factors").glob("*.pt")) == ["x1-0.pt", "x1-1.pt",
                                                                                        "x1-2.pt"]
    assert main([*args, "--out", str(tmp_path / "none.zarr"), "--factors-disk", "0", "--keep-factors"]) == 0
    assert not (tmp_path / "none.zarr" / "factors").exists()
    a, b = ntk_bench.open_kernel(tmp_path / "kept.zarr"), ntk_bench.open_kernel(tmp_path / "none.zarr")
    assert np.array_equal(np.asarray(a), np.asarray(b))
