"""`dvc plots show` opened in a real headless Chromium: every plot of dvc.yaml renders (a vega
canvas with ink on it, or a loaded image) and the browser console shows no error.

Two workspaces:
- a fixture (always runs, before any repro): dvc.yaml, .dvc/config, .dvc/plots/ and the plots
  page of this checkout, and tiny files in each plot's format (columns from its x / y / template)
  written for every plot path dvc.yaml names;
- the checkout itself after `dvc repro` (skipped with the missing files named when the pipeline
  outputs are absent; STEERLINE_PLOTS_REQUIRED=1, set by .ci/run after repro, makes that a
  failure).
Screenshots: reports/plots_screenshot_fixture.png and reports/plots_screenshot.png.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from browser import Browser, find_or_install

from steerline.cli.stages import expand_stages

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".svg", ".gif"}

# Every plot the page shows: images loaded, vega views drawn (vega-embed replaces the div's
# script by its view; ink = pixels that are neither transparent nor near-white).
CHECK = r"""
const plots = [];
for (const div of document.querySelectorAll('body > div')) {
  const img = div.querySelector('img');
  if (img) {
    plots.push({id: img.getAttribute('src'), kind: 'image',
                ok: img.complete && img.naturalWidth > 0, ink: img.naturalWidth});
    continue;
  }
  const canvas = div.querySelector('canvas');
  let ink = 0;
  if (canvas && canvas.width > 0 && canvas.height > 0) {
    const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    for (let i = 0; i < px.length; i += 4) {
      if (px[i + 3] > 0 && (px[i] < 240 || px[i + 1] < 240 || px[i + 2] < 240)) ink++;
    }
  }
  plots.push({id: div.id, kind: 'vega', ok: ink > 0, ink: ink});
}
return plots;
"""
READY = r"""
const divs = [...document.querySelectorAll('body > div')];
const done = divs.every(d => d.querySelector('img') ? d.querySelector('img').complete
                                                    : d.querySelector('canvas'));
return done ? divs.length : 0;
"""


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    try:
        return find_or_install()
    except RuntimeError as err:
        pytest.skip(f"no headless Chromium: {err}")


# ------------------------------------------------------------------------------ the fixture
def plot_definitions(dvc_yaml: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(file or directory, its properties) for every plot source in dvc.yaml, stage-level and
    top-level (a top-level plot with `y: {file: column(s)}` gives one entry per file)."""
    out: list[tuple[str, dict[str, Any]]] = []
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = expand_stages(dvc_yaml.get("stages", {}), params)
    entries = [e for st in stages.values() for e in st.get("plots") or []]
    for entry in entries:
        path, props = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        out.append((path, dict(props or {})))
    for entry in dvc_yaml.get("plots") or []:
        name, props = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        props = dict(props or {})
        if isinstance(props.get("y"), dict):
            for path, cols in props["y"].items():
                out.append((path, {**props, "y": cols}))
        else:
            out.append((name, props))
    return out


def write_image(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2), dpi=60)
    ax.imshow(np.arange(12).reshape(3, 4), cmap="RdBu_r")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_table(path: Path, props: dict[str, Any]) -> None:
    """Four rows with the plot's x and y columns (categorical y for bar templates, numbers
    otherwise) and ci_low / ci_high beside the value of a bar_ci plot. Several plots of one
    file add their columns to it."""
    template = str(props.get("template", "linear"))
    x = str(props.get("x", "step"))
    ys = props.get("y", "value")
    ys = [ys] if isinstance(ys, str) else list(ys)
    frame = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",") if path.is_file() \
        else pd.DataFrame(index=range(4))
    values = np.array([0.2, 0.5, 0.35, 0.8])
    categorical = template.startswith("bar")
    for i, col in enumerate([x, *ys]):
        if col in frame.columns:
            continue
        if categorical and col != x:
            frame[col] = [f"{col} {k}" for k in "abcd"]
        else:
            frame[col] = np.arange(4) if col == x and not categorical else values * (i + 1)
    if template == "bar_ci":
        frame["ci_low"] = frame[x] - 0.1
        frame["ci_high"] = frame[x] + 0.1
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        frame.to_json(path, orient="records")
    else:
        frame.to_csv(path, sep="\t" if path.suffix == ".tsv" else ",", index=False)


def plots_page() -> Path:
    page = ROOT / ".dvc/plots.html"
    if not page.is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts/plots_page.py"), str(page)],
                       check=True, cwd=ROOT)
    return page


def fixture_workspace(ws: Path) -> int:
    """A DVC workspace with this checkout's plot definitions and tiny plot files; returns the
    number of plot sources written."""
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    (ws / ".dvc").mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", ws / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", ws / "params.yaml")  # dvc.yaml's ${...} come from it
    shutil.copy(plots_page(), ws / ".dvc/plots.html")
    if (ROOT / ".dvc/plots").is_dir():
        shutil.copytree(ROOT / ".dvc/plots", ws / ".dvc/plots")
    config = (ROOT / ".dvc/config").read_text()
    (ws / ".dvc/config").write_text("[core]\n    no_scm = true\n" + config)
    defs = plot_definitions(dvc_yaml)
    for path, props in defs:
        target = ws / path
        if target.suffix.lower() in IMAGE_EXT:
            write_image(target)
        elif target.suffix in (".csv", ".tsv", ".json"):
            write_table(target, props)
        else:  # a dvclive directory: one metric file per plot
            write_table(target / "train" / "loss.tsv", {**props, "y": "loss"})
    return len(defs)


def show_and_check(ws: Path, out: Path, browser_bins: tuple[str, str], shot: Path) -> list[dict]:
    res = subprocess.run([DVC, "plots", "show", "-o", str(out)], cwd=ws, capture_output=True,
                         text=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert res.returncode == 0, res.stderr
    assert "failed to load" not in res.stdout + res.stderr, res.stdout + res.stderr
    html = (out / "index.html").read_text()
    assert "cdn.jsdelivr" not in html  # vega comes inlined from .dvc/plots.html, not a CDN
    with Browser(*browser_bins) as b:
        b.open(out / "index.html")
        b.wait_for(READY, timeout=60)
        plots = b.run(CHECK)
        errors = [e for e in b.console() if e.get("level") == "SEVERE"]
        b.screenshot(shot)
    assert not errors, errors
    blank = [p["id"] for p in plots if not p["ok"]]
    assert not blank, f"plots that did not render: {blank}"
    return plots


def test_plot_definitions_cover_every_kind():
    defs = dict(plot_definitions(yaml.safe_load((ROOT / "dvc.yaml").read_text())))
    assert any(Path(p).suffix == ".png" and "risk_diff_heatmap" in p for p in defs)
    assert any("gate_hist" in p for p in defs)  # per-attribute gate histograms
    assert any("train_steering" in p for p in defs) and any("finetune" in p for p in defs)
    assert any(v.get("template") == "bar_ci" and "safety_eval_bars" in p
               for p, v in defs.items())


def test_fixture_plots_render_in_chromium(chromium, tmp_path):
    n = fixture_workspace(tmp_path / "ws")
    shot = ROOT / "reports/plots_screenshot_fixture.png"
    plots = show_and_check(tmp_path / "ws", tmp_path / "out", chromium, shot)
    assert len(plots) >= n
    assert {p["kind"] for p in plots} == {"image", "vega"}
    assert shot.stat().st_size > 10_000


def test_pipeline_plots_render_in_chromium(chromium, tmp_path):
    defs = plot_definitions(yaml.safe_load((ROOT / "dvc.yaml").read_text()))
    missing = sorted({p for p, _ in defs if not (ROOT / p).exists()})
    if missing:
        reason = f"pipeline plot outputs absent (run dvc repro): {', '.join(missing)}"
        if os.environ.get("STEERLINE_PLOTS_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    plots_page()
    plots = show_and_check(ROOT, tmp_path / "out", chromium, ROOT / "reports/plots_screenshot.png")
    assert len(plots) >= len(defs)
