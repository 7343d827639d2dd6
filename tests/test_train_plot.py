"""`maestro-train plot` on a run folder as the trainer writes it, finished phases and one still running (a step line
half written, validation only in the latest checkpoint, steps logged twice by a resume)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from maestro_cli.train import main
from maestro_model.plots import read_run
from maestro_model.train import STATE_FILE


def _run_folder(root):
    root.mkdir()
    steps = [{"phase": "pretrain", "epoch": s // 5, "batch": s % 5, "step": s, "loss": 1 / s, "lr": 1e-4 * s}
             for s in range(1, 11)]
    steps += [{"phase": "pretrain", "epoch": 1, "batch": 0, "step": 6, "loss": 0.5, "lr": 6e-4}]  # resumed
    steps += [{"phase": "finetune", "epoch": 0, "batch": s - 1, "step": s, "loss": 2 / s, "lr": 1e-5}
              for s in range(1, 5)]
    text = "".join(json.dumps(r) + "\n" for r in steps) + '{"phase": "finetune", "ep'  # being written
    (root / "steps.jsonl").write_text(text)
    history = [{"epoch": e, "train_loss": 1 / e, "pretrain_loss_rec/val": 1.1 / e, "samples_val": 4,
                "samples_per_s": 9.0} for e in (1, 2)]
    (root / "pretrain").mkdir()
    (root / "pretrain" / "metrics.json").write_text(json.dumps({"phase": "pretrain", "history": history}))
    checkpoint = root / "checkpoints" / "finetune-e0001-b000000"
    checkpoint.mkdir(parents=True)
    running = [{"epoch": 1, "train_loss": 0.9, "finetune_treesat_mlc_thresh/weighted_f1_val": 0.4}]
    (checkpoint / STATE_FILE.format(0)).write_text(json.dumps({"progress": {"phase": "finetune",
                                                                            "history": running}}))
    (root / "checkpoints" / "latest").write_text(checkpoint.name)
    return root


def test_plot_reads_a_running_run_and_writes_the_same_png_twice(tmp_path):
    run = read_run(_run_folder(tmp_path / "run"))
    assert list(run) == ["pretrain", "finetune"]
    assert [s for s, _, _ in run["pretrain"]["steps"]] == list(range(1, 11))
    assert run["pretrain"]["steps"][5] == (6, 0.5, 6e-4)  # the resumed run's record of step 6
    assert run["pretrain"]["finished"] and len(run["pretrain"]["epochs"]) == 2
    assert len(run["finetune"]["steps"]) == 4 and not run["finetune"]["finished"]
    assert run["finetune"]["epochs"][0]["finetune_treesat_mlc_thresh/weighted_f1_val"] == 0.4
    outputs = []
    for name in ("a.png", "b.png"):
        result = CliRunner().invoke(main, ["plot", str(tmp_path / "run"), "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0].startswith(b"\x89PNG") and outputs[0] == outputs[1]


def test_plot_of_a_folder_without_records_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")])
    assert result.exit_code != 0 and "not a maestro-train run folder" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "steps.jsonl").write_text("{oops\n" + json.dumps({"phase": "pretrain", "step": 1}) + "\n")
    result = CliRunner().invoke(main, ["plot", str(tmp_path / "bad"), "--out", str(tmp_path / "x.png")])
    assert result.exit_code != 0 and "line 1 is not JSON" in result.output
