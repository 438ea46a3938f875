"""The curves plot of a run's metrics.jsonl."""

import json

import matplotlib.image

from denselora_jax.plot import main, read_metrics


def test_plot_writes_png_and_keeps_last_record_per_step(tmp_path):
    rows = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3 * s / 10} for s in range(1, 11)]
    rows[4]["val_loss"] = 2.5
    rows.append({"step": 10, "loss": 1.0, "lr": 0.0, "val_loss": 1.5})  # a resumed run re-logs step 10
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == list(range(1, 11)) and records[-1]["loss"] == 1.0
    assert main([str(tmp_path)]) == 0
    img = matplotlib.image.imread(tmp_path / "curves.png")
    assert img.shape[0] > 300 and img.shape[1] > 800 and img.std() > 0.01


def test_plot_refuses_a_directory_without_metrics(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
