"""What the smaller commands print: the analyze report and the redteam command's pool handling."""

from safetypatch.jobs.analyze import format_report


def test_analyze_report_lists_the_shift_and_the_files(monkeypatch):
    import safetypatch.geometry

    monkeypatch.setattr(safetypatch.geometry, "format_table", lambda records: f"TABLE({len(records)})")
    shift = {"benign": [0.01, 0.25], "harmful": [0.5, 1.0]}
    assert format_report([{}], shift, "geo") == (
        "TABLE(1)\n"
        "\nhidden-state shift ||h_patched - h_base|| / ||h_base|| at the last prompt token, per layer:\n"
        "layer   benign  harmful\n"
        "    0   0.0100   0.5000\n"
        "    1   0.2500   1.0000\n"
        "\nwritten: geo/geometry.json, overlap_heatmap.png, shift.json, shift.png")
    assert format_report([], None, None) == "TABLE(0)"
    assert format_report([], None, "geo") == "TABLE(0)\n\nwritten: geo/geometry.json, overlap_heatmap.png"


def test_redteam_command_passes_its_flags_to_the_rounds(monkeypatch, capsys):
    import safetypatch.jobs.redteam
    from safetypatch.cli import main

    seen = {}

    def fake_run(patch, pool, out, model, cfg):
        seen.update(patch=patch, n_pool=len(pool), out=out, model=model, cfg=cfg)
        return [{"round": 0, "failures_found": 0, "note": "n/a"}]

    monkeypatch.setattr(safetypatch.jobs.redteam, "run_redteam", fake_run)
    assert main(["redteam", "--patch", "P", "--out", "rt", "--rounds", "1", "--attacks", "aim", "--epochs", "3"]) == 0
    cfg = seen["cfg"]
    assert seen["patch"] == "P" and seen["out"] == "rt" and seen["model"] == "default" and seen["n_pool"] > 0
    assert cfg.rounds == 1 and cfg.attacks == ("none", "aim") and cfg.train["epochs"] == 3.0
    assert cfg.train["rank"] == 1  # the rest of the round recipe is kept
    assert capsys.readouterr().out.endswith("rounds: rt/redteam.json\n")
