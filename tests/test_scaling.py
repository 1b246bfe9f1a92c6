"""Compute accounting in training runs: summary.json, images and FLOPs logged, resume, config hash."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from diffusion_train.scaling.flops import forward_macs
from diffusion_train.train import train
from diffusion_train.training.summary import FORMAT, config_hash


def _summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("model", ["unet_tiny", "dit_tiny"])
def test_a_run_accounts_its_flops_and_indexes_evaluations_by_them(tiny_cfg, tmp_path, model):
    run = tmp_path / "run"
    trainer = train(tiny_cfg(f"model={model}", "trainer.max_steps=4", "scaling.budget=1e9", "scaling.size=XS"), run)
    s = _summary(run)
    backbone = trainer.lightning_module.backbone
    assert s["format"] == FORMAT and s["finished"] and s["steps"] == 4
    assert s["model"] == type(backbone).__name__
    assert s["params"] == sum(p.numel() for p in backbone.parameters())
    assert s["forward_macs_per_image"] == forward_macs(backbone)
    assert s["flops_per_image"] == 6 * s["forward_macs_per_image"]
    batch = trainer.datamodule.batch_size
    assert s["global_batch"] == batch and s["images_seen"] == 4 * batch
    assert s["total_flops"] == pytest.approx(s["images_seen"] * s["flops_per_image"])
    assert s["scaling"] == {"budget": 1e9, "size": "XS", "family": None}
    val = s["metrics"]["val/loss"]
    assert [h["step"] for h in val["history"]] == [2, 4]  # val_check_interval=2
    assert all(h["flops"] == pytest.approx(h["images"] * s["flops_per_image"]) for h in val["history"])
    assert val["final"] == val["history"][-1]["value"] and val["best"] == min(h["value"] for h in val["history"])
    assert s["wall_time_s"] > 0 and s["device"] == "cpu" and s["world_size"] == 1

    with open(run / "metrics.csv", newline="") as f:  # any metric can be plotted against them
        rows = [r for r in csv.DictReader(f) if r.get("perf/train_flops")]
    assert rows and all(float(r["perf/train_flops"]) == pytest.approx(float(r["perf/images_seen"]) * s["flops_per_image"])
                        for r in rows)


def test_a_resumed_run_continues_its_summary(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg("trainer.max_steps=4", "trainer.val_check_interval=2"), run)
    first = _summary(run)
    train(tiny_cfg("trainer.max_steps=8", "trainer.val_check_interval=2"), run)
    s = _summary(run)
    steps = [h["step"] for h in s["metrics"]["val/loss"]["history"]]
    assert steps == [2, 4, 6, 8]
    assert s["metrics"]["val/loss"]["history"][:1] == first["metrics"]["val/loss"]["history"][:1]
    assert s["wall_time_s"] > first["wall_time_s"] and s["steps"] == 8


def test_a_diverged_evaluation_is_null_in_the_summary_and_the_run_is_left_out_of_fits(tiny_cfg, tmp_path, monkeypatch):
    """A run whose last validation is NaN must not enter an IsoFLOP fit with an older, finite loss."""
    import math

    from diffusion_train.scaling.registry import load_summary
    from diffusion_train.training.module import DiffusionModule
    from diffusion_train.scaling.report import select

    end_of_validation = DiffusionModule.on_validation_epoch_end

    def diverged_at_step_4(self):
        if self.global_step == 4:
            self._val_total[0] = float("nan")
        end_of_validation(self)

    monkeypatch.setattr(DiffusionModule, "on_validation_epoch_end", diverged_at_step_4)
    run = tmp_path / "run"
    train(tiny_cfg("trainer.max_steps=4", "trainer.val_check_interval=2"), run)
    val = _summary(run)["metrics"]["val/loss"]
    assert [h["value"] is None for h in val["history"]] == [False, True] and val["final"] is None
    assert val["best"] == val["history"][0]["value"]
    record = load_summary(run / "summary.json")
    assert math.isnan(record.metrics["val/loss"].final)
    assert "final val/loss is nan" in select([record], "val/loss", unfinished=False)[record.source]


def test_an_evaluation_that_repeats_the_last_value_is_still_recorded(tiny_cfg, tmp_path, monkeypatch):
    """Every validation is a point of the history, also one whose value equals the one before (a k-of-N accuracy,
    or NaN twice): a summary that dropped it would end the curve early and name an older step as final."""
    from diffusion_train.training.module import DiffusionModule

    end_of_validation = DiffusionModule.on_validation_epoch_end

    def always_the_same(self):
        self._val_total[0] = torch.tensor([0.5, 1.0], dtype=self._val_total.dtype)
        end_of_validation(self)

    monkeypatch.setattr(DiffusionModule, "on_validation_epoch_end", always_the_same)
    run = tmp_path / "run"
    train(tiny_cfg("trainer.max_steps=6", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1"), run)
    history = _summary(run)["metrics"]["val/loss"]["history"]
    assert [(h["step"], h["value"]) for h in history] == [(2, 0.5), (4, 0.5), (6, 0.5)]


def test_the_config_hash_ignores_names_and_paths_but_not_training_settings(tiny_cfg, tmp_path):
    from diffusion_train.training.run_dir import resolved

    a = resolved(tiny_cfg("run_name=a", run_dir=tmp_path / "a"))
    b = resolved(tiny_cfg("run_name=b", run_dir=tmp_path / "b"))
    c = resolved(tiny_cfg("optim.lr=1e-3", run_dir=tmp_path / "a"))
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert len(config_hash(a)) == 12
    # other EMA averages: the same training, other val/loss_ema_* (a report of them must not merge the two runs)
    d = resolved(tiny_cfg("callbacks.ema.decays=[0.99]", "callbacks.ema.sample_decay=0.99", run_dir=tmp_path / "a"))
    e = resolved(tiny_cfg("callbacks.sample_grid.every_n_steps=7", "callbacks.ema.validate=[0.999]",
                          run_dir=tmp_path / "a"))
    assert config_hash(d) != config_hash(a) == config_hash(e)


# -- planning ----------------------------------------------------------------------------------------
def _plan(tmp_path, *args: str):
    import shutil
    import subprocess
    import sys

    from conftest import CONFIG_DIR

    conf = tmp_path / "conf"
    if not conf.exists():
        shutil.copytree(CONFIG_DIR, conf)
    out = subprocess.run([sys.executable, "scripts/scaling_plan.py", *args, f"out={conf / 'sweep' / 'plan.yaml'}"],
                         capture_output=True, text=True, timeout=300, cwd=CONFIG_DIR + "/..")
    return out, conf


@pytest.mark.slow
def test_the_isoflop_plan_lands_each_run_on_its_budget(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from diffusion_train.scaling.plan import FAMILIES

    base = "data=synthetic model.patch_size=4"
    out, conf = _plan(tmp_path, "budgets=2e10,6e10", "family=dit", "sizes=XS,S,M", "batch=16", f"base={base}",
                      "lr=1e-3", "lr_rule=inverse_width", "min_steps=20", "mfu=0.4", "peak_tflops=1e-6")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "left out: M at 2e+10 FLOPs" in out.stdout  # too few steps: reported, not run
    assert "warning: budget 2e+10 FLOPs has 2 sizes (XS, S): an IsoFLOP parabola needs 3" in out.stdout
    lines = {ln.split()[0]: ln for ln in out.stdout.splitlines() if ln.strip().startswith("C")}
    spent = {label: float(ln.split("C=")[1].split()[0]) for label, ln in lines.items()}
    for label, ln in lines.items():  # GPU-hours at 40% of a (tiny) 1e6 FLOP/s peak
        assert float(ln.split()[-2]) == pytest.approx(spent[label] / (0.4 * 1e6) / 3600, rel=2e-3), ln
    total = [ln for ln in out.stdout.splitlines() if ln.startswith("total: ")]
    assert len(total) == 1 and total[0].startswith("total: 5 runs, C=") and \
        total[0].endswith(" GPU-hours at 40% MFU of 1e-06 TFLOP/s")
    total_flops, hours = float(total[0].split("C=")[1].split()[0]), float(total[0].split(", ")[2].split()[0])
    assert total_flops == pytest.approx(sum(spent.values()), rel=1e-3)
    assert hours == pytest.approx(total_flops / 0.4e6 / 3600, rel=2e-3)
    points = []
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        plan = compose("train", overrides=["+sweep=plan", *base.split()]).scaling.plan
        for label in plan:
            cfg = compose("train", overrides=["+sweep=plan", *base.split(), f"scaling.point={label}",
                                              f"run_dir={tmp_path}"], return_hydra_config=True)
            hydra_cfg = {k: OmegaConf.to_container(cfg.hydra[k], resolve=True) for k in ("sweep", "sweeper")}
            del cfg.hydra
            points.append({**OmegaConf.to_container(cfg, resolve=True), "hydra": hydra_cfg})
    assert [(p["scaling"]["budget"], p["scaling"]["size"]) for p in points] == \
        [(2e10, "XS"), (2e10, "S"), (6e10, "XS"), (6e10, "S"), (6e10, "M")]
    sizes = FAMILIES["dit"]["sizes"]
    for p in points:
        entry = p["scaling"]["plan"][p["scaling"]["point"]]
        assert p["model"]["hidden_size"] == sizes[p["scaling"]["size"]]["hidden_size"]
        assert p["trainer"]["max_steps"] == entry["steps"] and p["scale"]["global_batch"] == 16
        assert p["optim"]["lr"] == pytest.approx(1e-3 * FAMILIES["dit"]["lr_width"] / p["model"]["hidden_size"],
                                                 rel=1e-3)
        assert p["hydra"]["sweep"]["subdir"] == p["scaling"]["point"] == f"C{p['scaling']['budget']:.3g}_{p['scaling']['size']}".replace("+", "")
        assert p["hydra"]["sweeper"]["params"]["scaling.point"] == "C2e10_XS,C2e10_S,C6e10_XS,C6e10_S,C6e10_M"
        landed = 6 * entry["forward_macs"] * 16 * entry["steps"]
        assert abs(landed / p["scaling"]["budget"] - 1) < 0.05


@pytest.mark.slow
def test_a_planned_run_spends_its_budget(tmp_path):
    """One point of a plan, trained: its summary.json total FLOPs are the budget within 5%."""
    from hydra import compose, initialize_config_dir

    base = "data=synthetic model.patch_size=4"
    out, conf = _plan(tmp_path, "budgets=3e9", "family=dit", "sizes=XS", "batch=16", f"base={base}", "min_steps=5")
    assert out.returncode == 0, out.stderr[-2000:]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        from conftest import TINY

        cfg = compose("train", overrides=[*[o for o in TINY if not o.startswith(("model=", "trainer.max_steps",
                                                                                  "trainer.val_check_interval"))],
                                          "+sweep=plan", *base.split(), f"run_dir={tmp_path / 'run'}"])
    train(cfg, tmp_path / "run")
    s = _summary(tmp_path / "run")
    assert s["scaling"]["budget"] == 3e9 and s["scaling"]["size"] == "XS"
    assert abs(s["total_flops"] / 3e9 - 1) < 0.05
    history = s["metrics"]["val/loss"]["history"]  # evaluated along the way, and at the last step
    assert len(history) > 1 and history[-1]["step"] == s["steps"]


@pytest.mark.slow
def test_a_wsd_plan_trains_trunks_then_cool_downs_that_land_on_their_budgets(tmp_path):
    """schedule=wsd: the trunk sweep trains each size's longest run and checkpoints it where the shorter runs' decays
    start; the cool-down sweep's runs branch there, decay, and land on their own budgets."""
    from hydra import compose, initialize_config_dir

    from conftest import TINY

    base = "data=synthetic model.patch_size=4"
    out, conf = _plan(tmp_path, "budgets=3e9,9e9", "family=dit", "sizes=XS", "batch=16", f"base={base}", "min_steps=5",
                      "schedule=wsd", "decay=0.25", "evals=2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cool-down of C9e09_XS from step 9: trains 3 steps" in out.stdout, out.stdout
    assert (conf / "sweep" / "plan_cooldowns.yaml").is_file() and "run plan first" in out.stdout
    tiny = [o for o in TINY if not o.startswith(("model=", "trainer.max_steps", "trainer.val_check_interval",
                                                 "callbacks.checkpoint", "lr_schedule."))]
    runs = {}
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        for sweep, label in (("plan", "C9e09_XS"), ("plan_cooldowns", "C3e09_XS")):
            sweeper = compose("train", overrides=[f"+sweep={sweep}", *base.split()],
                              return_hydra_config=True).hydra.sweeper.params["scaling.point"]
            assert sweeper == label
            runs[label] = compose("train", overrides=[*tiny, f"+sweep={sweep}", *base.split(),
                                                      f"run_dir={tmp_path / 'runs' / label}"])
    trunk, cool = runs["C9e09_XS"], runs["C3e09_XS"]
    assert list(trunk.callbacks.step_checkpoints.steps) == [9] and trunk.init.branch_from is None
    assert cool.lr_schedule.decay_steps == 3 and cool.lr_schedule.warmup_steps == trunk.lr_schedule.warmup_steps
    train(trunk, tmp_path / "runs" / "C9e09_XS")
    train(cool, tmp_path / "runs" / "C3e09_XS")
    s = _summary(tmp_path / "runs" / "C3e09_XS")
    assert s["scaling"]["budget"] == 3e9 and abs(s["total_flops"] / 3e9 - 1) < 0.05 and s["steps"] == 12
    assert s["metrics"]["val/loss"]["history"][-1]["step"] == 12
    run = json.loads((tmp_path / "runs" / "C3e09_XS" / "run.json").read_text())
    assert run["branched_from"] == {"checkpoint": str(tmp_path / "runs/C9e09_XS/checkpoints/step_0000009.ckpt"),
                                    "step": 9}


def test_budgets_whose_runs_share_a_label_are_refused():
    from diffusion_train.scaling.plan import isoflop_grid

    costs = [("XS", {"hidden_size": 64}, 1000, 10**6)]
    points, _ = isoflop_grid(costs, [1e12, 1.1e12], batch=1, lr=1e-3)
    assert [p.label for p in points] == ["C1e12_XS", "C1p1e12_XS"]
    with pytest.raises(ValueError, match=r"give runs the same label \(C1e12_XS\)"):
        isoflop_grid(costs, [1e12, 1.0004e12], batch=1, lr=1e-3)


def test_inverse_width_gives_a_size_the_same_rate_whichever_sizes_a_plan_samples():
    from diffusion_train.scaling.plan import isoflop_grid

    ladder = [("XS", {"hidden_size": 64}, 1000, 10**6), ("S", {"hidden_size": 96}, 3000, 3 * 10**6),
              ("M", {"hidden_size": 128}, 9000, 10**7)]

    def rates(costs):
        points, _ = isoflop_grid(costs, [1e12], batch=1, lr=1e-3, lr_rule="inverse_width", lr_width=64)
        return {p.size: p.lr for p in points}

    assert rates(ladder) == {"XS": 1e-3, "S": pytest.approx(1e-3 * 64 / 96, rel=1e-3), "M": 5e-4}
    assert rates(ladder[1:]) == {size: rate for size, rate in rates(ladder).items() if size != "XS"}
    with pytest.raises(ValueError, match="inverse_width needs lr_width"):
        isoflop_grid(ladder, [1e12], batch=1, lr=1e-3, lr_rule="inverse_width")


def test_a_point_left_out_says_why():
    from diffusion_train.scaling.plan import isoflop_grid

    costs = [("XS", {"hidden_size": 64}, 1000, 10**6), ("S", {"hidden_size": 96}, 3000, 10**8)]
    _, skipped = isoflop_grid(costs, [1e8 * 6 * 1.4], batch=1, lr=1e-3, min_steps=1)
    assert skipped == ["S at 8.4e+08 FLOPs: 1 steps spend 6e+08 FLOPs, more than 5% off"]
    _, skipped = isoflop_grid(costs, [1e8 * 6 * 1.4], batch=1, lr=1e-3, min_steps=2)
    assert skipped == ["S at 8.4e+08 FLOPs: 1.4 steps (min_steps=2)"]


def test_a_budget_with_fewer_than_three_sizes_is_warned_of():
    """A budget that min_steps leaves with 1 or 2 sizes cannot give an IsoFLOP parabola: the plan says so before
    its compute is spent (the report flagged it only after)."""
    from diffusion_train.scaling.plan import isoflop_grid, thin_budgets

    costs = [(size, {"hidden_size": 64}, 1000 * 10**i, 10**6 * 10**i) for i, size in enumerate(["XS", "S", "M"])]
    budgets = [6e8 * 100, 6e8 * 10]
    points, skipped = isoflop_grid(costs, budgets, batch=1, lr=1e-3, min_steps=20)
    assert [p.size for p in points if p.budget == 6e9] == ["XS", "S"] and len(skipped) == 1
    assert thin_budgets(points, budgets) == ["budget 6e+09 FLOPs has 2 sizes (XS, S): an IsoFLOP parabola needs 3, "
                                             "so it gives no N_opt"]
    assert thin_budgets(points[:1], budgets)[0].startswith("budget 6e+09 FLOPs has 1 size (XS): ")
    points, _ = isoflop_grid(costs, budgets, batch=1, lr=1e-3, min_steps=1)
    assert thin_budgets(points, budgets) == []


def test_a_plan_with_no_feasible_run_is_refused(tmp_path):
    out, _ = _plan(tmp_path, "budgets=1e3", "family=dit", "sizes=XS", "base=data=synthetic")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: no run of the plan gets 20 steps")


@pytest.mark.slow
def test_the_summary_reaches_the_wandb_run(tmp_path):
    """The scalar fields go into the W&B run summary and `scaling` into its config (a real offline run, in
    its own process: W&B flushes the record file when the process ends, and a W&B service started in
    the test process would be shared by every later child process; the file is binary, so the test
    looks for the field names in it)."""
    import subprocess
    import sys

    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "diffusion_train.train", "experiment=smoke", "trainer.max_steps=2",
                          "scaling.size=XS", f"hydra.run.dir={run}"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    records = b"".join(p.read_bytes() for p in (run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert records and all(key in records for key in (b"flops_per_image", b"total_flops", b"config_hash", b"XS"))


def test_an_isoflop_multirun_that_sweeps_more_than_its_points_is_refused(tmp_path):
    """An IsoFLOP sweep names each job's directory by its point: sweeping seeds too would make the seed-1 job resume
    the seed-0 job's run. Every job refuses, before it writes anything; with one seed the sweep trains."""
    import subprocess
    import sys

    from conftest import CONFIG_DIR

    def multirun(seeds: str):
        args = ["-m", "+sweep=isoflop_fmnist", "experiment=fmnist", "model.patch_size=4", "scaling.point=C3e11_XXXS",
                f"seed={seeds}", "trainer.max_steps=2", "lr_schedule.warmup_steps=1", "logger=csv",
                "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                f"hydra.sweep.dir={tmp_path / seeds.replace(',', '_')}"]
        return subprocess.run([sys.executable, "-m", "diffusion_train.train", *args], capture_output=True, text=True,
                              timeout=300, cwd=Path(CONFIG_DIR).parent)

    out = multirun("0,1")
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == (
        "error: this multirun sweeps seed besides scaling.point, but its job directories are named by the point alone "
        "(hydra.sweep.subdir=C3e11_XXXS): jobs would share one; sweep the other settings in separate multiruns with "
        "their own run_name (e.g. run_name=<name>_seed1 seed=1)"), out.stderr[-2000:]
    assert not (tmp_path / "0_1" / "C3e11_XXXS" / "checkpoints").exists()
    out = multirun("0")
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "0" / "C3e11_XXXS" / "checkpoints" / "last.ckpt").is_file()
