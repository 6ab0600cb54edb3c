"""loggers.py: TensorBoard events and prune_results.csv in the run folder, read back with tensorboard's reader."""

from __future__ import annotations

import csv
import json


from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from yolo_prune_plugin.cli import main
from yolo_prune_plugin.tools.loggers import CSV_NAME, find_yolo_loggers, log_results
from yolo_prune_plugin.tools.synthetic import TINY, make_dataset


def _events(folder):
    files = list(folder.glob("events.out.tfevents.*.yolo_prune"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _scalar(acc, tag):
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


ENTRY = {"checkpoint": "/r/weights/best.pt", "output": "/r/weights/best_pruned.pt", "method": "global", "amount": 0.3,
         "metrics_before": {"P": 0.61, "R": 0.56, "mAP50": 0.74, "mAP50-95": 0.36},
         "metrics_after": {"P": 0.6, "R": 0.44, "mAP50": 0.57, "mAP50-95": 0.33},
         "sparsity_before": {"sparsity": 0.001, "nonzero": 1000}, "sparsity_after": {"sparsity": 0.3, "nonzero": 700}}


def test_log_results_round_trip(tmp_path):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(2, 1))
    fig.savefig(tmp_path / "sweep.png")
    plt.close(fig)
    history = [{"epoch": 0, "sparsity": 0.1, "mAP50-95": 0.2, "leaked": {"model": 0, "ema": 0}},
               {"epoch": 1, "sparsity": 0.3, "mAP50-95": 0.25, "leaked": {"model": 0, "ema": 0}, "leaked_saved": 0}]
    sweep = {"points": [{"method": "global", "amount": 0.5, "sparsity": 0.5, "P": 0.4, "R": 0.3, "mAP50": 0.3,
                         "mAP50-95": 0.2, "retention": 0.6}],
             "outputs": {"png": str(tmp_path / "sweep.png")}}
    out = log_results(tmp_path, [ENTRY], history=history, sweep=sweep)
    acc = _events(tmp_path)
    assert out["events"] and out["events"].parent == tmp_path
    for stage, m in (("before", ENTRY["metrics_before"]), ("after", ENTRY["metrics_after"])):
        for k, v in m.items():
            assert _scalar(acc, f"prune/best/{stage}/{k}") == [(0, v)]
    assert _scalar(acc, "prune/best/after/sparsity") == [(0, 0.3)]
    assert _scalar(acc, "prune/history/sparsity") == [(0, 0.1), (1, 0.3)]
    assert _scalar(acc, "prune/history/leaked") == [(0, 0.0), (1, 0.0)]
    assert _scalar(acc, "sweep/global/mAP50-95") == [(50, 0.2)]
    assert acc.Tags()["images"] == ["sweep/accuracy_vs_sparsity"]
    rows = list(csv.DictReader((tmp_path / CSV_NAME).open()))
    assert len(rows) == 1 and rows[0]["mAP50_after"] == "0.57" and rows[0]["sparsity_after"] == "0.3"


def test_trackers_get_the_same_scalars(tmp_path):
    class Run:
        def __init__(self):
            self.logged = []

        def log(self, d):
            self.logged.append(d)

    class Loggers:  # stands in for YOLOv5's utils.loggers.Loggers with W&B active
        def __init__(self):
            self.wandb = type("W", (), {"wandb_run": Run()})()
            self.clearml = None

        def on_fit_epoch_end(self, *a):
            pass

    from yolo_prune_plugin.backend.loading import get_backend

    cb = get_backend().Callbacks()
    lg = Loggers()
    cb.register_action("on_fit_epoch_end", callback=lg.on_fit_epoch_end)
    assert find_yolo_loggers(cb) is lg
    out = log_results(tmp_path, [ENTRY], yolo_loggers=lg)
    assert out["trackers"] == ["wandb"]
    assert lg.wandb.wandb_run.logged[0]["prune/best/after/mAP50"] == 0.57


def test_cli_prune_writes_events_and_csv_beside_report(backend, small_model, tmp_path):
    from testkit import save_checkpoint

    data = make_dataset(tmp_path / "data", **TINY.dataset_kwargs())
    small_model.names = {0: "circle", 1: "rectangle", 2: "triangle"}
    (tmp_path / "w").mkdir()
    ck = save_checkpoint(small_model, tmp_path / "w" / "best.pt")
    rc = main(["prune", "--weights", str(ck), "--data", str(data), "--amount", "0.4", "--device", "cpu",
               "--img", "64", "--workers", "0"])
    assert rc == 0
    entry = json.loads((ck.parent / "prune_report.json").read_text())["results"][0]
    acc = _events(ck.parent)
    assert _scalar(acc, "prune/best/after/mAP50-95") == [(0, round(entry["metrics_after"]["mAP50-95"], 6))]
    assert _scalar(acc, "prune/best/after/sparsity") == [(0, round(entry["sparsity_after"]["sparsity"], 6))]
    rows = list(csv.DictReader((ck.parent / CSV_NAME).open()))
    assert float(rows[0]["P_before"]) == entry["metrics_before"]["P"]
