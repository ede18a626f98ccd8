"""promtool on deploy/prometheus: the config and rule files load, and the rule unit tests
(synthetic series: every alert fires on a burn and stays silent when healthy) pass.
Skipped when promtool is not installed (Debian/Ubuntu: apt-get install prometheus)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(PROMTOOL is None,
                                reason="promtool not installed (apt-get install prometheus)")


def promtool(*args: str, cwd: Path = PROM) -> str:
    out = subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    return text


def test_check_config():
    text = promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in text


def test_check_rules():
    files = sorted(str(p.relative_to(PROM)) for p in (PROM / "rules").glob("*.yml"))
    assert files
    text = promtool("check", "rules", *files)
    assert "FAILED" not in text


def test_rule_unit_tests():
    files = sorted(str(p.relative_to(PROM)) for p in (PROM / "tests").glob("*.yml"))
    assert files
    text = promtool("test", "rules", *files)
    assert text.count("SUCCESS") == len(files), text
