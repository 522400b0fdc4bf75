"""`safetypatch report`: reading demo runs, sweeps and suite evals (synthetic files shaped like the real ones),
bad inputs named, the output kept unless --overwrite, the different-models banner, the Pareto front, the runs table
and the page itself (self-contained, deterministic, one figure per chart). The browser check is in
test_report_browser.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from safetypatch.cli import main
from safetypatch.errors import ConfigError, OutputExistsError
from safetypatch.jobs.report import ReportConfig, run_report
from safetypatch.reports import pareto_front, read_runs, render_report, runs_table

CATEGORIES = ("cybercrime", "drugs", "weapons")
FP_SMOL = {"fingerprint_version": 2, "architecture": "LlamaForCausalLM", "model_type": "llama", "num_layers": 4,
           "hidden_size": 64, "vocab_size": 400, "num_parameters": 1000, "shapes_sha256": "a" * 64,
           "weights_sha256": "b" * 64}
FP_GEMMA = {**FP_SMOL, "architecture": "Gemma3ForCausalLM", "model_type": "gemma3_text", "weights_sha256": "c" * 64}
RECIPE = {"rank": 4, "alpha": 64.0, "target_modules": ["mlp.up"], "layers": "middle", "method": "lora", "lr": 0.002,
          "epochs": 3.0, "mix_ratio": 0.0, "seed": 0}


def dump(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    return path


def samples(rates: dict[tuple[str, str], float], per_category: int = 4, suite: bool = False) -> list[dict]:
    """Judged answers: for each (variant, set) the given share refused, spread over CATEGORIES."""
    rows = []
    for (variant, kind), rate in rates.items():
        n = per_category * len(CATEGORIES)
        for i in range(n):
            row = {"model": variant, "prompt": f"p{i}", "response": "r", "refusal_xstest": i < round(rate * n),
                   "refusal_gcg": False, "id": f"{kind}-{i}", "category": CATEGORIES[i % len(CATEGORIES)]}
            row.update({"benchmark": f"builtin_{kind}", "attack": "none", "label": kind} if suite else {"set": kind})
            rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_demo(d: Path, model: str = "default", fp: dict = FP_SMOL, harmful=(0.14, 0.92), benign=(0.01, 0.05),
               calibration: bool = True) -> Path:
    """A `safetypatch demo --out d` run: summary.json, samples.jsonl, patch/patch.json."""
    results = {kind: {"base": {"n": 84, "refusal_xstest": rates[0]}, "patched": {"n": 84, "refusal_xstest": rates[1]},
                      "difference": {"refusal_xstest": rates[1] - rates[0]}}
               for kind, rates in (("harmful", harmful), ("benign", benign))}
    dump(d / "summary.json", {"model": model, "patch": str(d / "patch"), "recipe": RECIPE, "results": results,
                              "patch_bytes": 171464, "train_seconds": 585.2, "total_seconds": 798.7,
                              "primary_judge": "refusal_xstest", "training": {"steps": 3}})
    write_jsonl(d / "samples.jsonl", samples({("base", "harmful"): harmful[0], ("patched", "harmful"): harmful[1],
                                              ("base", "benign"): benign[0], ("patched", "benign"): benign[1]}))
    meta = {"base_model": {"spec": model, "fingerprint": fp}, "recipe": RECIPE, "format": "safetypatch/1",
            "weights": {"file": "adapter_model.safetensors", "bytes": 171464, "sha256": "0" * 64}}
    if calibration:
        meta["calibration"] = {"date": "2026-12-02", "chosen_factor": 0.75, "within_budget": True, "budget": 0.05,
                               "base_benign_refusal": 0.02, "curve": [
                                   {"factor": f, "harmful_refusal": min(1.0, 0.1 + f * 0.8),
                                    "benign_refusal": 0.02 + 0.06 * f * f} for f in (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)]}
    dump(d / "patch" / "patch.json", meta)
    return d


def suite_summary(model: str, fp: str, harmful: tuple[float, float], benign: tuple[float, float], kl: float,
                  mmlu: tuple[float, float]) -> dict:
    """A `safetypatch eval --suite` summary.json with refusal, KL and MMLU metrics for base and patched."""
    metrics = []
    for i, variant in enumerate(("base", "patched")):
        metrics += [
            {"variant": variant, "benchmark": "builtin_harmful", "attack": "none", "judge": "refusal_xstest",
             "metric": "refusal_rate", "value": harmful[i], "n": 12},
            {"variant": variant, "benchmark": "builtin_benign", "attack": "none", "judge": "refusal_xstest",
             "metric": "refusal_rate", "value": benign[i], "n": 12},
            {"variant": variant, "benchmark": "kl_builtin_benign", "attack": "", "judge": "", "metric": "kl_per_token",
             "value": 0.0 if variant == "base" else kl, "n": 12},
            {"variant": variant, "benchmark": "mmlu", "attack": "", "judge": "", "metric": "accuracy",
             "value": mmlu[i], "n": 12}]
    entries = {"builtin_harmful": {"type": "safety", "kind": "harmful"},
               "builtin_benign": {"type": "safety", "kind": "benign"},
               "kl_builtin_benign": {"type": "kl", "kind": None}, "mmlu": {"type": "mc", "kind": None}}
    return {"suite": "sweep", "model": model, "model_fingerprint": fp, "patch": None, "entries": entries,
            "metrics": metrics, "results": {}, "seconds": 12.5}


def geometry_records(rank: int) -> list[dict]:
    out = []
    for layer in (1, 2):
        for module in ("mlp.up_proj", "self_attn.q_proj"):
            rec = {"layer": layer, "module": module, "weight": f"model.layers.{layer}.{module}.weight", "d_out": 64,
                   "d_in": 32}
            for k in (1, 8):
                rec[f"energy_right_k{k}"] = min(1.0, 0.02 * k * (layer + rank / 4))
                rec[f"random_energy_right_k{k}"] = k / 32
                rec[f"sim_k{k}"], rec[f"random_sim_k{k}"] = 0.3, 0.2
            out.append(rec)
    return out


def write_sweep(d: Path, name: str = "rank", axis: str = "rank", values=(1, 4, 16, 64), unfinished: int = 1,
                model: str = "default", fp_id: str | None = None) -> Path:
    """A `safetypatch sweep` directory: sweep.json, finished points (eval, patch, geometry) and `unfinished`
    points without point.json."""
    from safetypatch.modeling import fingerprint_id

    fp_id = fp_id or fingerprint_id(FP_SMOL)
    points = [{"name": f"{name}-{v if not isinstance(v, list) else '+'.join(v)}".replace(".", "_"),
               "values": {axis: v}, "recipe": {**RECIPE, axis: v}} for v in values]
    dump(d / "sweep.json", {"kind": "safetypatch-sweep", "name": name, "description": f"{axis} sweep",
                            "quick": True, "axes": [axis], "suite": "sweep", "eval": {"suite": "sweep"},
                            "geometry": True, "source": f"{name}.yaml", "model": model, "base_recipe": RECIPE,
                            "points": points})
    for i, p in enumerate(points[:len(points) - unfinished]):
        pdir = d / "points" / p["name"]
        dump(pdir / "point.json", {**p, "sweep": name, "status": "done", "output": "train/patch", "eval": "eval",
                                   "seconds": {"train": 10.0 + i, "eval": 5.0, "geometry": 1.0},
                                   "geometry": "geometry", "finished": "2026-12-02T20:00:00+00:00",
                                   "model_fingerprint": fp_id, "headline": {}})
        h = min(0.95, 0.5 + 0.1 * i)
        dump(pdir / "eval" / "summary.json", suite_summary(model, fp_id, (0.1, h), (0.02, 0.02 + 0.03 * i),
                                                           0.01 * (i + 1), (0.40, 0.40 - 0.01 * i)))
        write_jsonl(pdir / "eval" / "samples.jsonl", samples({("base", "harmful"): 0.1, ("patched", "harmful"): h,
                                                              ("base", "benign"): 0.0, ("patched", "benign"): 0.1},
                                                             suite=True))
        dump(pdir / "train" / "patch" / "patch.json", {"base_model": {"spec": model, "fingerprint": FP_SMOL},
                                                       "recipe": p["recipe"], "weights": {"bytes": 1000 * (i + 1)}})
        dump(pdir / "geometry" / "geometry.json", geometry_records(4 * (i + 1)))
    return d


# ------------------------------------------------------------------------------------------------ reading
def test_reads_a_demo_run(tmp_path):
    [row] = read_runs([str(write_demo(tmp_path / "demo"))])
    assert (row.kind, row.name, row.model, row.status) == ("demo", "demo", "default", "done")
    assert (row.base.harmful, row.patched.harmful, row.patched.benign) == (0.14, 0.92, 0.05)
    assert row.calibration["chosen_factor"] == 0.75 and row.patch_bytes == 171464
    assert row.architecture == "LlamaForCausalLM" and row.fingerprint
    assert set(row.categories) == {"harmful", "benign"}
    assert set(row.categories["harmful"]) == set(CATEGORIES)
    assert row.categories["harmful"]["cybercrime"]["patched"] > row.categories["harmful"]["cybercrime"]["base"]


def test_reads_a_sweep_with_an_unfinished_point(tmp_path):
    rows = read_runs([str(write_sweep(tmp_path / "sw"))])
    assert [r.name for r in rows] == ["rank-1", "rank-4", "rank-16", "rank-64"]
    assert [r.status for r in rows] == ["done"] * 3 + ["not finished"]
    first = rows[0]
    assert first.kind == "sweep-point" and first.sweep == "rank" and first.values == {"rank": 1}
    assert first.patched.utility == {"kl_per_token": 0.01, "mmlu accuracy": 0.40}
    assert first.geometry and first.patch_bytes == 1000 and first.seconds["train"] == 10.0
    assert rows[-1].patched is None and not rows[-1].done
    assert len({r.model_key for r in rows}) == 1  # the unfinished point joins the fingerprint of its model spec


def test_reads_a_suite_eval_dir_and_the_summary_file_itself(tmp_path):
    d = tmp_path / "suite"
    dump(d / "summary.json", suite_summary("m", "0123456789abcdef", (0.0, 0.5), (0.0, 0.25), 0.3, (0.3, 0.3)))
    for path in (d, d / "summary.json"):
        [row] = read_runs([str(path)])
        assert (row.kind, row.patched.harmful, row.patched.benign, row.fingerprint) == ("suite", 0.5, 0.25,
                                                                                      "0123456789abcdef")


def test_finetuned_and_base_only_suites(tmp_path):
    full = suite_summary("m", "f" * 16, (0.0, 0.6), (0.0, 0.1), 0.5, (0.3, 0.2))
    for m in full["metrics"]:
        m["variant"] = "finetuned" if m["variant"] == "patched" else m["variant"]
    dump(tmp_path / "full" / "summary.json", full)
    base = suite_summary("m", "f" * 16, (0.0, 0.6), (0.0, 0.1), 0.5, (0.3, 0.2))
    base["metrics"] = [m for m in base["metrics"] if m["variant"] == "base"]
    dump(tmp_path / "base" / "summary.json", base)
    ft, only = read_runs([str(tmp_path / "full"), str(tmp_path / "base")])
    assert (ft.patched.harmful, ft.status, ft.done) == (0.6, "done", True)
    assert (only.patched, only.status, only.done, only.base.harmful) == (None, "base only", False, 0.0)


def test_a_failed_point_is_listed_not_plotted(tmp_path):
    d = write_sweep(tmp_path / "sw", values=(1, 2), unfinished=0)
    point = d / "points" / "rank-2" / "point.json"
    dump(point, {**json.loads(point.read_text()), "status": "failed"})
    rows = read_runs([str(d)])
    assert [(r.status, r.done) for r in rows] == [("done", True), ("failed", False)]


@pytest.mark.parametrize("case, match", [
    ("missing", "no such file or directory"),
    ("empty-dir", "holds no sweep.json or summary.json"),
    ("plain-file", "not a directory"),
    ("wrong-kind", "field 'kind' is 'something-else', expected 'safetypatch-sweep'"),
    ("corrupt-sweep", "sweep.json: not valid JSON"),
    ("corrupt-summary", "summary.json: not valid JSON"),
    ("unknown-summary", "neither a demo summary"),
    ("bad-points", "field 'points' is a dict, expected list"),
    ("corrupt-point", "point.json: not valid JSON"),
    ("corrupt-samples", "samples.jsonl:2: not valid JSON"),
    ("bad-geometry", "geometry.json: expected a list of records"),
    ("point-name", "is not a plain directory name"),
    ("eval-missing", "the point is marked done but"),
])
def test_bad_inputs_are_named(tmp_path, case, match):
    path = tmp_path / case
    if case == "empty-dir":
        path.mkdir()
    elif case == "plain-file":
        path.write_text("x")
    elif case == "wrong-kind":
        dump(path / "sweep.json", {"kind": "something-else"})
    elif case == "corrupt-sweep":
        path.mkdir()
        (path / "sweep.json").write_text('{"kind": "safetypatch-sweep", ')
    elif case == "corrupt-summary":
        path.mkdir()
        (path / "summary.json").write_text("{nope")
    elif case == "unknown-summary":
        dump(path / "summary.json", {"hello": 1})
    elif case == "bad-points":
        dump(path / "sweep.json", {"kind": "safetypatch-sweep", "name": "x", "axes": ["rank"], "points": {}})
    elif case == "eval-missing":
        write_sweep(path, values=(1,), unfinished=0)
        (path / "points" / "rank-1" / "eval" / "summary.json").unlink()
    elif case in ("corrupt-point", "bad-geometry", "point-name"):
        write_sweep(path, values=(1, 2), unfinished=0)
        target = {"corrupt-point": path / "points" / "rank-1" / "point.json",
                  "bad-geometry": path / "points" / "rank-2" / "geometry" / "geometry.json"}.get(case)
        if target is not None:
            target.write_text("{" if case == "corrupt-point" else '{"layer": 1}')
        else:
            sweep = json.loads((path / "sweep.json").read_text())
            sweep["points"][0]["name"] = "../escape"
            dump(path / "sweep.json", sweep)
    elif case == "corrupt-samples":
        write_demo(path)
        with open(path / "samples.jsonl", "r+") as f:
            first = f.readline()
            f.seek(0)
            f.write(first + "{broken\n")
            f.truncate()
    with pytest.raises(ConfigError, match=re.escape(match)) as e:
        read_runs([str(path)])
    assert str(tmp_path) in str(e.value)


def test_cli_prints_one_error_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "nope"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "nope: no such file or directory" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ pure parts
def test_pareto_front_on_hand_made_points():
    pts = [(0.10, 0.90), (0.05, 0.80), (0.20, 0.85), (0.00, 0.20), (0.05, 0.70), (0.10, 0.90), (0.30, 0.95)]
    # (0.20, 0.85) is beaten by (0.10, 0.90); (0.05, 0.70) by (0.05, 0.80); the two equal points both stay
    assert pareto_front(pts) == [3, 1, 0, 5, 6]
    assert pareto_front([]) == [] and pareto_front([(0.5, 0.5)]) == [0]
    assert pareto_front([(0.1, 0.5), (0.1, 0.6)]) == [1]


def test_runs_table_holds_every_run_with_its_recipe(tmp_path):
    rows = read_runs([str(write_demo(tmp_path / "demo")), str(write_sweep(tmp_path / "sw"))])
    table = runs_table(rows)
    assert table.count("<tr") == 1 + len(rows)
    assert "14.0% &rarr; 92.0%" in table and "1.0% &rarr; 5.0%" in table
    assert table.count('class="unfinished"') == 1 and "not finished" in table
    assert table.count("<details>") == len(rows) and "rank=64" in table and "167.4 KiB" in table


def test_table_escapes_what_it_shows(tmp_path):
    d = write_demo(tmp_path / "<b>x</b>")
    html = runs_table(read_runs([str(d)]))
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html


# ------------------------------------------------------------------------------------------------ the page
def charts_of(html: str) -> list[str]:
    return re.findall(r'<figure class="chart" data-chart="([^"]+)"', html)


def test_page_has_every_chart_and_loads_nothing(tmp_path):
    inputs = [str(write_demo(tmp_path / "demo")), str(write_sweep(tmp_path / "sw"))]
    html, charts = render_report(read_runs(inputs), "t", inputs)
    names, n = charts_of(html), len(charts)
    assert n == len(names) and len(set(names)) == n
    assert {"frontier", "axis-rank", "dial", "categories"} <= set(names)
    assert sum(name.startswith("geometry-") for name in names) == 3
    assert html.count("<svg") == n and 'id="models-banner"' not in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?https?:|@import""", html)
    assert "<title>rank-16 (rank)" in html  # a point's hover text
    assert "Data-ratio curve: no sweep over the axis" in html
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids)), "ids repeat across charts"


def test_data_ratio_curve_and_categorical_axes(tmp_path):
    inputs = [str(write_sweep(tmp_path / "mix", "mix", "mix_ratio", (0.0, 0.1, 0.25, 0.5), unfinished=0)),
              str(write_sweep(tmp_path / "lay", "layers", "layers", ("early", "middle", "late", "all"))),
              str(write_sweep(tmp_path / "tm", "targets", "target_modules", (["mlp.up"], ["attn.q", "attn.v"])))]
    html, _ = render_report(read_runs(inputs), "t", inputs)
    names = charts_of(html)
    assert {"axis-mix_ratio", "axis-layers", "axis-target_modules"} <= set(names)
    assert "Data-ratio curve (mix_ratio)" in html and "Data-ratio curve: no sweep" not in html


def test_different_base_models_get_a_banner(tmp_path):
    inputs = [str(write_demo(tmp_path / "smol")), str(write_demo(tmp_path / "gem", "gemma3-270m", FP_GEMMA))]
    rows = read_runs(inputs)
    html, _ = render_report(rows, "t", inputs)
    assert 'id="models-banner"' in html and "2 different base models" in html
    assert "gemma3-270m (Gemma3ForCausalLM)" in html and "default (LlamaForCausalLM)" in html
    same = [str(write_demo(tmp_path / "smol2"))]
    html, _ = render_report(read_runs([inputs[0], *same]), "t", [inputs[0], *same])
    assert "models-banner" not in html


def test_same_spec_with_another_fingerprint_is_another_model(tmp_path):
    other = {**FP_SMOL, "weights_sha256": "d" * 64}
    rows = read_runs([str(write_demo(tmp_path / "a")), str(write_demo(tmp_path / "b", fp=other))])
    assert rows[0].model_key != rows[1].model_key and rows[0].model_label != rows[1].model_label


def test_output_is_deterministic_and_kept_without_overwrite(tmp_path):
    demo = str(write_demo(tmp_path / "demo", calibration=False))
    out = tmp_path / "r.html"
    message = run_report(ReportConfig(inputs=[demo], output=str(out)))
    assert "1 run (1 finished)" in message and out.exists()
    first = out.read_bytes()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_report(ReportConfig(inputs=[demo], output=str(out)))
    run_report(ReportConfig(inputs=[demo], output=str(out), overwrite=True, title="again"))
    assert out.read_bytes().replace(b"again", b"safetypatch report: demo") == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "r.html"]  # no temp or lock file left


def test_cli_report_command(tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(write_demo(tmp_path / "demo")), "--output", str(out), "--title", "T"]) == 0
    assert "wrote" in capsys.readouterr().out and "<title>T</title>" in out.read_text()


def test_figures_are_written_as_standalone_svg_files(tmp_path, capsys):
    import xml.etree.ElementTree as ET

    inputs = [str(write_demo(tmp_path / "demo")), str(write_sweep(tmp_path / "sw"))]
    out, figs = tmp_path / "r.html", tmp_path / "figs"
    assert main(["report", *inputs, "-o", str(out), "--figures", str(figs)]) == 0
    files = sorted(p.stem for p in figs.glob("*.svg"))
    assert files == sorted(charts_of(out.read_text())) and "frontier" in files
    for f in figs.glob("*.svg"):
        assert ET.parse(f).getroot().tag == "{http://www.w3.org/2000/svg}svg"  # a well-formed SVG document
    assert main(["report", *inputs, "-o", str(tmp_path / "r2.html"), "--figures", str(figs)]) == 2
    assert "--overwrite" in capsys.readouterr().err and not (tmp_path / "r2.html").exists()
