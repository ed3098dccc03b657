"""The README is a manual that stays true: its config overview matches `src/gcache/conf/`, CI finds
its install and test commands, its links resolve, and the GPQA converter it names reproduces the
offline JSONL byte for byte.

Formats this test reads in README.md:
- the groups table, headed `| group | options | default | ... |`: one row per config group, its
  options and default as backticked names (no backticks in the default cell = no default);
- key tables, headed `` | `<file under conf/>` | default | ... | ``: one row per key, the key and
  its default backticked. A file in a group (`rollout/default.yaml`) has keys written with the
  group's prefix (`rollout.latent_steps`); a top-level file's keys are paths in it (`study.limit`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CONF = REPO / "src" / "gcache" / "conf"
DOCS = REPO / "docs"
GPQA_JSONL_SHA256 = "cb4a093a0a803eb464424c0b1a0f8e88a2a84be214e8c7856c88fe732c447545"
TICKED = re.compile(r"`([^`]+)`")


def _lines() -> list[str]:
    return README.read_text(encoding="utf-8").splitlines()


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _tables() -> list[tuple[list[str], list[list[str]]]]:
    """Every Markdown table of the README: (header cells, body rows' cells)."""
    tables, lines, i = [], _lines(), 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header, rows, i = _cells(lines[i]), [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            tables.append((header, rows))
        else:
            i += 1
    return tables


def _render(value) -> str:
    """A YAML value as the README writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_render(v)}" for k, v in value.items()) + "}"
    return str(value)


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


# ---- the config overview ---------------------------------------------------------------------


def test_the_groups_table_lists_every_group_and_option_with_train_yaml_defaults():
    (rows,) = [rows for header, rows in _tables() if header[:3] == ["group", "options", "default"]]
    listed = {TICKED.findall(row[0])[0]: row for row in rows}
    assert sorted(listed) == sorted(d.name for d in CONF.iterdir() if d.is_dir())
    defaults = {}
    for entry in _load(CONF / "train.yaml")["defaults"]:
        if isinstance(entry, dict):
            defaults.update(entry)
    for group, row in listed.items():
        options = TICKED.findall(row[1])
        assert len(options) == len(set(options)), f"{group}: an option listed twice"
        assert sorted(options) == sorted(p.stem for p in (CONF / group).glob("*.yaml")), group
        default = TICKED.findall(row[2])
        assert (default[0] if default else None) == defaults[group], group


def _key_tables() -> dict[str, list[list[str]]]:
    return {TICKED.fullmatch(header[0]).group(1): rows for header, rows in _tables()
            if TICKED.fullmatch(header[0]) and header[0].endswith(".yaml`")}


def test_key_tables_cover_the_main_files():
    tables = _key_tables()
    for name in ("rollout/default.yaml", "policy/default.yaml", "train.yaml", "evaluate.yaml", "study.yaml"):
        assert tables.get(name), f"README has no key table for {name}"
    (model,) = [rows for name, rows in tables.items() if name.startswith("model/")]
    assert {"`model.device`", "`model.dtype`"} <= {row[0] for row in model}


@pytest.mark.parametrize("name", sorted(_key_tables()))
def test_every_listed_key_exists_with_its_default(name):
    data = _load(CONF / name)
    prefix = name.split("/")[0] + "." if "/" in name else ""
    for row in _key_tables()[name]:
        key, default = TICKED.fullmatch(row[0]), TICKED.fullmatch(row[1])
        assert key and default, f"{name}: a row needs a backticked key and default: {row}"
        key = key.group(1)
        assert key.startswith(prefix), f"{name}: {key} should start with {prefix!r}"
        node = data
        for part in key.removeprefix(prefix).split("."):
            assert isinstance(node, dict) and part in node, f"{key} is not a key of conf/{name}"
            node = node[part]
        assert default.group(1) == _render(node), f"{key}: README says {default.group(1)}, conf/{name} {node!r}"


# ---- shape, CI markers, links, data paths ----------------------------------------------------


def _readme_command(marker: str) -> str | None:
    """What `.ci/run` extracts: the first line of the code block after the exact marker line."""
    found = inblock = False
    for line in _lines():
        if not found:
            found = line == f"<!-- {marker} -->"
        elif line.startswith("```"):
            if inblock:
                return None
            inblock = True
        elif inblock:
            return line
    return None


def test_readme_is_a_short_manual_with_the_ci_commands_near_the_top():
    lines = _lines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines (at most 300)"
    assert _readme_command("install") == 'pip install torch==2.13.0 -e ".[embedded,dev]"'
    assert _readme_command("test") == "python -m pytest"
    assert lines.index("<!-- test -->") < 40


def test_no_paths_outside_the_repository():
    for page in [README, *sorted(DOCS.glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for bad in ("../", "/work/"):
            assert bad not in text, f"{page.name} names a path outside the repository: {bad}"


def test_every_relative_link_resolves():
    pages = [README, *sorted(DOCS.glob("*.md"))]
    linked_docs = set()
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.name} links to {target}, which does not exist"
            if page == README and path.parent == DOCS:
                linked_docs.add(path)
    assert linked_docs == set(DOCS.glob("*.md")), "every docs/ page is linked from the README"


def test_the_data_table_names_every_file_a_task_reads():
    read = set()
    for module in (REPO / "src" / "gcache" / "tasks").glob("*.py"):
        read |= set(re.findall(r'"((?:gsm8k|gpqa|medqa|humaneval|mbppplus)/[\w.-]+\.jsonl?(?:\.gz)?)"',
                               module.read_text(encoding="utf-8")))
    named = {name for line in _lines() for name in TICKED.findall(line)}
    assert len(read) == 6 and read <= named, sorted(read - named)


def test_license_is_apache_2():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("Copyright 2026 The gcache authors\n")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text()


# ---- scripts/convert_gpqa.py -----------------------------------------------------------------


def _converter():
    spec = importlib.util.spec_from_file_location("convert_gpqa", REPO / "scripts" / "convert_gpqa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_gpqa_copies_values_verbatim(tmp_path):
    columns = ["Question", "Record ID", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
               "Incorrect Answer 3", "Explanation", "Subdomain", "High-level domain", "Canary String", "Other"]
    row = ['What is "ħ"?\nTwo lines', "rec1", " 42\n", "1", "2 ", "3", "because", "Sub", "Physics", "canary", "x"]
    src = tmp_path / "in.csv"
    src.write_text(",".join(columns) + "\n" + ",".join('"' + v.replace('"', '""') + '"' for v in row) + "\n",
                   encoding="utf-8")
    dst = tmp_path / "out" / "gpqa_diamond.jsonl"
    assert _converter().convert(src, dst) == 1
    assert dst.read_bytes().decode("utf-8") == (  # verbatim: not stripped, not ASCII-escaped, \n line ends
        '{"record_id": "rec1", "question": "What is \\"ħ\\"?\\nTwo lines", "correct_answer": " 42\\n", '
        '"incorrect_answers": ["1", "2 ", "3"], "high_level_domain": "Physics", "subdomain": "Sub", '
        '"explanation": "because", "canary": "canary"}\n'
    )


def test_convert_gpqa_reproduces_the_offline_jsonl(data_dir, tmp_path):
    csv_path, shipped = data_dir / "gpqa" / "gpqa_diamond.csv", data_dir / "gpqa" / "gpqa_diamond.jsonl"
    if not csv_path.is_file():
        pytest.skip(f"{csv_path} is not there (only the JSONL is needed to run gcache)")
    out = tmp_path / "gpqa_diamond.jsonl"
    _converter().main([str(csv_path), str(out)])
    assert hashlib.sha256(out.read_bytes()).hexdigest() == GPQA_JSONL_SHA256
    assert out.read_bytes() == shipped.read_bytes()
