"""Every Markdown file that the code, configuration or docs name exists (a review found three modules citing a
CORE_API contract file that never existed)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".yml", ".yaml", ".toml", ".sh", ".js", ".html", ".cfg"}
OUTPUTS = {"certify.md"}  # names of files a command writes (python -m training certify), not files of the tree
REFERENCE = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w-]+\.md)\b")


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in listed.splitlines() if Path(p).suffix in SUFFIXES or Path(p).name == "Makefile"]


def _exists(ref: str, cited_in: Path, names: set[str]) -> bool:
    """A path exists from the root or from the citing file's folder; a bare name is some tracked file's name."""
    if "/" in ref:
        return (ROOT / ref).exists() or (cited_in.parent / ref).exists()
    return ref in names


def test_every_named_markdown_file_exists() -> None:
    files = _tracked_text_files()
    names = {p.name for p in files}
    missing = []
    for path in files:
        if not path.is_file():
            continue
        for line_no, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            for ref in REFERENCE.findall(line):
                if ref in OUTPUTS:
                    continue
                if not _exists(ref, path, names):
                    missing.append(f"{path.relative_to(ROOT)}:{line_no}: {ref}")
    assert not missing, missing
