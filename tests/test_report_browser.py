"""The report in a real browser: headless Chromium opens the page offline, its console shows nothing (the page logs
nothing, so any console line is an error, a blocked load or a script failure), every chart drew (the page's own
check, `data-charts-drawn="OK/TOTAL"` on <body>, read back with --dump-dom) and a screenshot is not blank.

Chromium is Debian's `chromium` package: installed here with apt-get where it is missing and we are root, else the
tests are skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import FP_GEMMA, write_demo, write_sweep

from safetypatch.cli import main

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
APT_TIMEOUT = 900


def find_browser() -> str | None:
    return next((path for name in NAMES if (path := shutil.which(name))), None)


def apt_install() -> str:
    """Install Debian's chromium; '' when done, else why not."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in (["apt-get", "install", "-y", "--no-install-recommends", "chromium"], ["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        try:
            done = subprocess.run(attempt, capture_output=True, text=True, timeout=APT_TIMEOUT, env=env)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"`{' '.join(attempt)}` failed: {type(e).__name__}"
        if done.returncode == 0 and attempt[1] == "install":
            return ""
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return f"`apt-get install chromium` failed: {tail[0][:200]}"


@pytest.fixture(scope="session")
def browser() -> str:
    """The path of a Chromium, installed when missing (root with apt-get), else the tests are skipped."""
    found = find_browser()
    if found:
        return found
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no chromium on PATH and no way to install it here (needs root and apt-get): "
                    "`apt-get install chromium` to run the browser checks")
    why = apt_install()
    found = find_browser()
    if not found:
        pytest.skip(f"no chromium on PATH: {why or 'installed, but not found on PATH'}")
    return found


def run_browser(browser: str, page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           f"--user-data-dir={tmp / 'profile'}", "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=5000", *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def console_lines(stderr: str) -> list[str]:
    """Chromium's console lines ('...:CONSOLE(12)] "message", source: ...'): the page writes none, so each one
    is an error (an exception, a resource blocked or missing, a console.error)."""
    return [line for line in stderr.splitlines() if re.search(r":CONSOLE[:(\]]|Uncaught", line)]


def check_page(browser: str, page: Path, tmp: Path) -> tuple[str, list[str]]:
    """(data-charts-drawn as the browser set it, console lines) of a page."""
    done = run_browser(browser, page, tmp, "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    drawn = re.search(r'<body[^>]*\bdata-charts-drawn="([^"]*)"', done.stdout)
    return (drawn.group(1) if drawn else "never set"), console_lines(done.stderr)


def distinct_colours(png: Path) -> int:
    from PIL import Image

    with Image.open(png) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 24)
    return len(colours or [])


def chart_count(html: str) -> int:
    return len(re.findall(r'<figure class="chart" data-chart=', html))


def test_console_lines_are_found():
    stderr = ('[1:1:1202/212628.066766:ERROR:dbus/bus.cc:405] Failed to connect to the bus\n'
              '[1:1:1202/212628.575240:INFO:CONSOLE:2] "boom", source: file:///x.html (2)\n'
              '[1:1:1202/212628.575240:INFO:CONSOLE(7)] "Uncaught ReferenceError: f is not defined", source: x (7)\n')
    assert len(console_lines(stderr)) == 2


def test_report_draws_in_the_browser(browser, tmp_path):
    inputs = [write_demo(tmp_path / "smol-demo"), write_sweep(tmp_path / "rank"),
              write_sweep(tmp_path / "mix", "mix", "mix_ratio", (0.0, 0.1, 0.25, 0.5), unfinished=0),
              write_demo(tmp_path / "gemma-demo", "gemma3-270m", FP_GEMMA, calibration=False)]
    page = tmp_path / "report.html"
    assert main(["report", *map(str, inputs), "-o", str(page)]) == 0
    html = page.read_text()
    n = chart_count(html)
    assert n >= 8 and 'id="models-banner"' in html
    drawn, console = check_page(browser, page, tmp_path)
    assert drawn == f"{n}/{n}", f"charts drawn: {drawn} of {n}"
    assert console == [], "console:\n" + "\n".join(console)
    shot = tmp_path / "shot.png"
    done = run_browser(browser, page, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    assert distinct_colours(shot) > 10


def test_single_demo_report_draws(browser, tmp_path):
    demo = write_demo(tmp_path / "demo")
    page = tmp_path / "r.html"
    assert main(["report", str(demo), "-o", str(page)]) == 0
    n = chart_count(page.read_text())
    assert n == 3  # frontier, dial, per-category
    drawn, console = check_page(browser, page, tmp_path)
    assert (drawn, console) == (f"{n}/{n}", [])


def test_the_check_can_fail(browser, tmp_path):
    """A chart without its drawing, a script error and a load from the network (blocked by the page's
    Content-Security-Policy) are caught."""
    demo = write_demo(tmp_path / "demo")
    page = tmp_path / "r.html"
    assert main(["report", str(demo), "-o", str(page)]) == 0
    html = page.read_text()
    n = chart_count(html)
    broken = re.sub(r"<svg .*?</svg>", "<svg></svg>", html, count=1, flags=re.S)
    broken = broken.replace("</body>", '<img src="https://example.invalid/x.png"><script>undefinedFunction();'
                            "</script></body>")
    page.write_text(broken)
    drawn, console = check_page(browser, page, tmp_path)
    assert drawn == f"{n - 1}/{n}"
    assert any("undefinedFunction" in line for line in console)
    assert any("example.invalid" in line for line in console), "a network load went unreported"
