"""bench/results/README.md, the manifest, against the files under bench/results: every file listed
(and every listed file present), and every JSON's code commit either recorded in the JSON itself
(bench/stamp.py's `stamp.commit`, or the older `code.commit` of allreduce_bw.py) and named by its
row, or, for a file that predates the stamp, said to be "unknown" with the commit that added it
(checked against git). The checks live in manifest_problems() so that the tests below can show
them failing on a doctored copy."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
MANIFEST = "README.md"
HASH = re.compile(r"`([0-9a-f]{7,40})`")


def _git(repo: str, *args: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def manifest_rows(text: str) -> list[dict]:
    """The rows of the manifest's tables that have a "code commit" column: files (the backticked
    names of the first cell), code commit cell, added-in cell."""
    rows, cols = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            cols = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cols is None:
            cols = cells
            continue
        if set(line) <= set("|-: "):
            continue
        if "code commit" not in cols or "added in" not in cols:
            continue
        rows.append({"files": re.findall(r"`([^`]+)`", cells[0]), "commit": cells[cols.index("code commit")],
                     "added": cells[cols.index("added in")], "line": line[:120]})
    return rows


def recorded_commit(data) -> str | None:
    """The commit a result JSON records for the code it ran: stamp.commit, else code.commit."""
    if not isinstance(data, dict):
        return None
    for key in ("stamp", "code"):
        c = (data.get(key) or {}).get("commit") if isinstance(data.get(key), dict) else None
        if c:
            return c
    return None


def _first_write_result(repo: str) -> str | None:
    """The first commit whose bench/stamp.py has write_result (every script stamps from then on)."""
    out = _git(repo, "log", "--format=%H", "--reverse", "-S", "def write_result", "--", "bench/stamp.py")
    return out.split()[0] if out and out.split() else None


def _added_in(repo: str) -> dict:
    """Each path under bench/results (relative to it) -> the commit that first added it at that path."""
    out, commit = {}, None
    for line in (_git(repo, "log", "--diff-filter=A", "--no-renames", "--format=@%H", "--name-only", "--",
                      "bench/results") or "").splitlines():
        if line.startswith("@"):
            commit = line[1:]
        elif line.strip():
            out[os.path.relpath(line.strip(), "bench/results").replace(os.sep, "/")] = commit  # oldest last
    return out


def manifest_problems(results: str, repo: str | None) -> list[str]:
    """Everything wrong with the manifest of the folder results; repo: the git checkout to check
    the "added in" commits against (None: not checked)."""
    problems = []
    with open(os.path.join(results, MANIFEST)) as f:
        rows = manifest_rows(f.read())
    present = {os.path.relpath(os.path.join(root, n), results).replace(os.sep, "/")
               for root, _, names in os.walk(results) for n in names}
    present.discard(MANIFEST)
    listed = {}
    for row in rows:
        for name in row["files"]:
            if name in listed:
                problems.append(f"{name}: listed twice")
            listed[name] = row
    problems += [f"{n}: in bench/results but not in the manifest" for n in sorted(present - set(listed))]
    problems += [f"{n}: in the manifest but not in bench/results" for n in sorted(set(listed) - present)]
    stamp_since = _first_write_result(repo) if repo else None
    added_in = _added_in(repo) if repo else {}
    for row in rows:
        files = [n for n in row["files"] if n in present]
        named = HASH.search(row["commit"])
        unknown = row["commit"].startswith("unknown")
        if not named and not unknown:
            problems.append(f"{row['line']}: code commit is neither a commit nor 'unknown'")
        for name in (n for n in files if n.endswith(".json")):
            with open(os.path.join(results, name)) as f:
                text = f.read()
            rec = recorded_commit(json.loads(text))
            if rec is None and named and named.group(1) not in text:
                problems.append(f"{name}: records no commit, and its row's {named.group(1)} is not in the file")
            if rec is not None and not (named and rec.startswith(named.group(1)) or named and named.group(1).startswith(rec)):
                problems.append(f"{name}: records commit {rec}; its row says {row['commit']!r}")
        added = HASH.search(row["added"])
        if not added:
            problems.append(f"{row['line']}: no 'added in' commit")
            continue
        if repo is None:
            continue
        for name in files:
            first = added_in.get(name)
            if not first or not first.startswith(added.group(1)):
                problems.append(f"{name}: added in {first[:10] if first else 'no commit (not committed)'}, "
                                f"its row says {added.group(1)}")
            elif unknown and stamp_since and _git(repo, "merge-base", "--is-ancestor", stamp_since, first) is not None:
                problems.append(f"{name}: code commit 'unknown', but added after bench/stamp.py's write_result "
                                "existed: write it with write_result (it stamps the commit)")
    return problems


def _git_checkout() -> str | None:
    top = _git(REPO, "rev-parse", "--show-toplevel")
    return REPO if top and os.path.samefile(top.strip(), REPO) else None


def test_manifest_lists_every_result_with_its_commit():
    problems = manifest_problems(RESULTS, _git_checkout())
    assert not problems, "bench/results/README.md:\n" + "\n".join(problems)


@pytest.fixture
def results_copy(tmp_path):
    dst = tmp_path / "results"
    shutil.copytree(RESULTS, dst)
    return dst


def test_manifest_check_catches_a_missing_line(results_copy):
    readme = results_copy / MANIFEST
    lines = readme.read_text().splitlines(keepends=True)
    gone = next(i for i, line in enumerate(lines) if line.startswith("| `exit_stress.json`"))
    readme.write_text("".join(lines[:gone] + lines[gone + 1:]))
    assert manifest_problems(str(results_copy), None) == ["exit_stress.json: in bench/results but not in the manifest"]


def test_manifest_check_catches_an_unstamped_or_misnamed_result(results_copy):
    # a new result with no commit: listed, but neither stamped nor "unknown"
    (results_copy / "new_run.json").write_text(json.dumps({"rows": []}))
    readme = results_copy / MANIFEST
    readme.write_text(readme.read_text() + "\n| file(s) | what | command | code commit | added in |\n|---|---|---|---|---|\n"
                      "| `new_run.json` | a run | `python x.py` | `0123456` | `0123456` 2026-12-01 |\n")
    assert manifest_problems(str(results_copy), None) == [
        "new_run.json: records no commit, and its row's 0123456 is not in the file"]
    # the same file stamped by bench/stamp.py with another commit than its row names
    (results_copy / "new_run.json").write_text(json.dumps({"rows": [], "stamp": {"commit": "89abcdef" * 5}}))
    assert manifest_problems(str(results_copy), None) == [
        "new_run.json: records commit " + "89abcdef" * 5 + "; its row says '`0123456`'"]


def test_manifest_check_catches_a_wrong_added_in_commit(tmp_path):
    repo = _git_checkout()
    if repo is None:
        pytest.skip("not a git checkout: the 'added in' commits cannot be checked")
    problems = manifest_problems(RESULTS, repo)
    assert not problems
    # the same manifest with one file's "added in" commit swapped for another real commit
    text = open(os.path.join(RESULTS, MANIFEST)).read()
    line = next(x for x in text.splitlines() if x.startswith("| `exit_stress.json`"))
    head = _git(repo, "rev-parse", "--short=7", "HEAD").strip()
    doctored = text.replace(line, re.sub(r"\| `[0-9a-f]+` (\S+) \|$", f"| `{head}` \\1 |", line))
    folder = tmp_path / "bench" / "results"
    shutil.copytree(RESULTS, folder)
    (folder / MANIFEST).write_text(doctored)
    rows = [r for r in manifest_rows(doctored) if "exit_stress.json" in r["files"]]
    assert rows and head in rows[0]["added"]
    assert any(p.startswith("exit_stress.json: added in") for p in manifest_problems(str(folder), repo))
