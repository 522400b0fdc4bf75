import json
import subprocess
import sys

from safetypatch.cli import main


def test_help_is_fast_and_imports_no_torch():
    code = "import sys; from safetypatch.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_train_flag_errors_are_clear(tmp_path, capsys):
    rc = main(["train", "--out", str(tmp_path / "r"), "--rank", "zero"])
    assert rc == 2 and "field 'rank'" in capsys.readouterr().err
    cfg = tmp_path / "x.yaml"
    cfg.write_text("epochs: -1\n")
    rc = main(["train", "--out", str(tmp_path / "r"), "--config", str(cfg)])
    assert rc == 2 and "x.yaml: field 'epochs' must be > 0" in capsys.readouterr().err


def test_cli_train_then_patch_info(tiny_model_dir, harmful_file, benign_file, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_model_dir), "--data", str(harmful_file), "--benign", str(benign_file),
               "--out", str(out), "--epochs", "1", "--batch-size", "4", "--layers", "0-1", "--dev-size", "2",
               "--dev-tokens", "2", "--anchor-tokens", "4", "--bf16", "no", "--rank", "2"])
    assert rc == 0
    capsys.readouterr()
    assert main(["patch", "info", str(out / "patch"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rank"] == 2 and info["layers"] == [0, 1] and len(info["sha256"]) == 64
