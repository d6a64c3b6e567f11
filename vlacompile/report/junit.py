"""A build's gates as JUnit XML (one test case per gate), the format GitLab and GitHub render.

pass -> a passing case; fail -> <failure>; not_verified (an estimate, or no figure) -> <skipped>,
since nothing was measured that could pass or fail.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def junit_xml(report: dict[str, Any]) -> str:
    gates = (report.get("gates") or {}).get("gates") or []
    target = str(report.get("target", "target"))
    failures = sum(g["status"] == "fail" for g in gates)
    skipped = sum(g["status"] == "not_verified" for g in gates)
    seconds = float(report.get("verify_seconds") or 0.0)
    suites = ET.Element("testsuites", name="vlacompile", tests=str(len(gates)), failures=str(failures), errors="0",
                        skipped=str(skipped), time=f"{seconds:.3f}")
    suite = ET.SubElement(suites, "testsuite", name=f"vlacompile.{target}", tests=str(len(gates)), failures=str(failures),
                          errors="0", skipped=str(skipped), time=f"{seconds:.3f}")
    for g in gates:
        case = ET.SubElement(suite, "testcase", classname=f"vlacompile.{target}.gates", name=str(g["name"]), time="0")
        text = (f"{g['name']} = {g.get('value')} (limit {g.get('comparison', '')} {g.get('limit')}{g.get('unit') or ''}); "
                f"{g.get('kind', '')}: {g.get('source', '')}" + (f"; {g['note']}" if g.get("note") else ""))
        if g["status"] == "fail":
            ET.SubElement(case, "failure", message=f"{g['name']} misses its limit", type="GateFailed").text = text
        elif g["status"] == "not_verified":
            ET.SubElement(case, "skipped", message="not verified: " + (g.get("note") or "an estimate is not a measurement"))
        ET.SubElement(case, "system-out").text = text
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def write_junit(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(junit_xml(report), encoding="utf-8")
    return path
