"""Rank logic under ``torch.distributed.run`` on the CPU: two real processes in a gloo process group.

YOLOv5's DDP needs CUDA, so what is checked here is the plugin's part: the environment YOLOv5 reads
(RANK/WORLD_SIZE/LOCAL_RANK), only rank 0 deciding what is pruned, the other ranks taking its decision, and
the check that all ranks hold the same pruned state (a mismatch raises on every rank).
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
#: a collective that waits longer than this fails instead of hanging the suite; the whole spawn is joined with
#: a deadline too
GLOO_TIMEOUT = datetime.timedelta(seconds=60)
SPAWN_DEADLINE_S = 180


def _worker(r: int, init_file: str, out_dir: str) -> None:
    os.environ.update(RANK=str(r), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(r))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD, timeout=GLOO_TIMEOUT)
    try:
        from yolo_prune_plugin.backend import distributed as D
        from yolo_prune_plugin.backend.loading import get_backend
        from yolo_prune_plugin.config import config_from_dict
        from yolo_prune_plugin.errors import PruneError
        from yolo_prune_plugin.training.masks import zero_masks
        from yolo_prune_plugin.training.schedule import GradualPruning

        torch.manual_seed(0 if r == 0 else 1)  # rank 1's weights differ: its own ranking would differ
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3))
        gp = GradualPruning(config_from_dict({"schedule": {"final_amount": 0.5, "end_epoch": 1}}), get_backend())
        gp.keeper.model, gp.keeper.optimizer = model, torch.optim.SGD(model.parameters(), lr=0.1)
        gp._step(1)
        masks = zero_masks(model)
        try:
            D.check_identical(f"rank {r}", "test state")
            mismatch = None
        except PruneError as e:
            mismatch = str(e)
        res = {"main": D.is_main_process(), "steps": len(gp.steps), "digest": D.tensors_digest(masks),
               "zeros": sum(int(m.sum()) for m in masks.values()), "mismatch": mismatch,
               "shared": D.from_rank0({"file": "best_pruned.pt"} if r == 0 else None)}
        Path(out_dir, f"rank{r}.json").write_text(json.dumps(res))
        dist.barrier()  # both ranks are done with every collective before either tears gloo down (else an abort)
    finally:
        dist.destroy_process_group()


def _spawn(worker, *args) -> None:
    """``mp.spawn`` joined with a deadline: a hung rank fails the test (its processes killed) instead of the suite."""
    ctx = mp.spawn(worker, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    while not ctx.join(timeout=5):  # raises when a rank failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the {WORLD} gloo ranks did not finish within {SPAWN_DEADLINE_S} s")


def test_only_rank0_prunes_and_every_rank_ends_with_its_masks(tmp_path):
    _spawn(_worker, str(tmp_path / "init"), str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(WORLD))
    assert (r0["main"], r1["main"]) == (True, False)
    assert (r0["steps"], r1["steps"]) == (1, 0)  # rank 0 ranked and recorded the step, rank 1 did not
    assert r0["digest"] == r1["digest"] and r0["zeros"] == r1["zeros"] > 0  # same zeros despite other weights
    assert r1["shared"] == {"file": "best_pruned.pt"}  # what rank 0 decided reaches the others
    for r in (r0, r1):  # a real disagreement is an error on every rank, naming both
        assert "differ between DDP ranks" in r["mismatch"] and "rank 0: rank 0" in r["mismatch"]


@pytest.mark.parametrize("env,main", [({}, True), ({"RANK": "0", "WORLD_SIZE": "2"}, True),
                                      ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, False)])
def test_rank_from_the_environment_without_a_process_group(monkeypatch, env, main):
    from yolo_prune_plugin.backend import distributed as D

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert D.is_main_process() is main
    assert not D.distributed() and D.from_rank0("x") == "x"  # no group: single-process behaviour
    D.check_identical("anything", "no-op")


def _as_if_launched_by_torchrun(backend, monkeypatch) -> dict:
    """Rank 0 of two, as ``torch.distributed.run`` starts it: the environment, and YOLOv5's rank globals (read once
    at import) saying so. Returns ``{module: its rank globals}`` as set."""
    import importlib

    from yolo_prune_plugin.backend import distributed as D

    launched = {"LOCAL_RANK": 0, "RANK": 0, "WORLD_SIZE": 2}
    for k, v in launched.items():
        monkeypatch.setenv(k, str(v))
    seen = {}
    for rel in D._RANK_MODULES:
        mod = importlib.import_module(backend.prefix + rel)
        for k, v in launched.items():
            if hasattr(mod, k):
                monkeypatch.setattr(mod, k, v)
                seen.setdefault(rel, {})[k] = v
    return seen


@pytest.mark.parametrize("single", [True, False])
def test_finetune_after_ddp_runs_on_rank0_as_one_process(backend, tiny_model, tiny_data, tiny_cfg, tmp_path,
                                                         monkeypatch, single):
    """The train-end fine-tune of a DDP run: YOLOv5's ``main`` would set up DDP again (a second process group, and
    on this CPU its 'insufficient CUDA devices' assert); the plugin runs it as one process on rank 0 and gives YOLOv5
    its rank globals and the environment back afterwards. ``single=False`` is the control without that."""
    import importlib

    from yolo_prune_plugin import api
    from yolo_prune_plugin.backend import distributed as D
    from yolo_prune_plugin.training import finetune as F

    from testkit import save_checkpoint

    w = save_checkpoint(tiny_model, tmp_path / "dense.pt")
    opt = api.train_opt([], backend, data=str(tiny_data), cfg=str(tiny_cfg), weights="", imgsz=64, batch_size=2,
                        device="cpu", workers=0, noplots=True, noautoanchor=True, project=str(tmp_path), name="base")
    seen = _as_if_launched_by_torchrun(backend, monkeypatch)
    if not single:
        monkeypatch.setattr(F, "launched_distributed", lambda: False)
        with pytest.raises(AssertionError, match="CUDA"):
            F.finetune_checkpoint(w, opt, 1, masks=None, project=tmp_path, name="ft", backend=backend)
        return
    assert D.launched_distributed()
    res = F.finetune_checkpoint(w, opt, 1, masks=None, project=tmp_path, name="ft", backend=backend)
    assert [r["epoch"] for r in res.history] == [0] and res.best.is_file()
    for rel, values in seen.items():  # undone: YOLOv5 and the environment say rank 0 of 2 again
        mod = importlib.import_module(backend.prefix + rel)
        assert {k: getattr(mod, k) for k in values} == values
    assert (os.environ["LOCAL_RANK"], os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", "0", "2")
