"""The README stays a short tour (under 300 lines) and every local link in it and in docs/ resolves."""
import re
import shutil
import subprocess

from conftest import ROOT

LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(path) -> set[str]:
    """GitHub's heading anchors of a markdown file: lowercase, spaces to '-', punctuation dropped."""
    out = set()
    for line in path.read_text().splitlines():
        if m := re.match(r"^#{1,6} (.+)$", line):
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return out


def broken_links(path) -> list[str]:
    bad = []
    for target in LINK.findall(path.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        where = (path.parent / file).resolve() if file else path
        if not where.exists() or (anchor and where.suffix == ".md" and anchor not in anchors(where)):
            bad.append(target)
    return bad


def test_readme_is_a_short_tour():
    assert len((ROOT / "README.md").read_text().splitlines()) < 300


def test_every_local_link_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = {p.name: broken_links(p) for p in pages}
    assert not {k: v for k, v in broken.items() if v}


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"(docs/{p.name})" not in readme] == []


def test_the_link_check_finds_a_broken_link(tmp_path):
    page = tmp_path / "a.md"
    page.write_text("# Title here\n[ok](a.md#title-here) [missing](b.md) [bad anchor](a.md#nope)\n")
    assert broken_links(page) == ["b.md", "a.md#nope"]


def test_readme_refusal_table_is_the_committed_records_output():
    """The README's refusal table is generated from reports/refusals/refusals.jsonl, never typed; every committed
    measurement is a one-line exit 2 with no folder left (within 10 s, but the first build of lm-eval's index)."""
    import json

    from experiments.refusals import table

    records = [json.loads(line) for line in (ROOT / "reports/refusals/refusals.jsonl").read_text().splitlines()]
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- refusals:start -->\n", 1)[1].split("\n<!-- refusals:end -->", 1)[0]
    assert block == table(records), "regenerate: python -m experiments.refusals --table reports/refusals/refusals.jsonl"
    for r in records:
        assert (r["exit"], r["lines"], r["folder_left"], r["expected"]) == (2, 1, False, True), r["what"]
        assert r["seconds"] < 10 or "first check" in r["what"], r["what"]


# paths the docs name as where a user's own run writes (the default `results=`, an example command), not records
WRITTEN_BY_THE_READER = {"results/records.jsonl", "results/ablation_correlation.jsonl"}


def cited_records(text: str) -> set[str]:
    return set(re.findall(r"results/[\w.-]+\.jsonl", text))


def test_every_cited_record_is_committed():
    """A number in the docs names the records it comes from: each of those files is in the checkout (a clean
    clone holds only what git tracks, and results/ is ignored but for the listed exceptions)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    cited = set().union(*(cited_records(p.read_text()) for p in pages)) - WRITTEN_BY_THE_READER
    assert sorted(c for c in cited if not (ROOT / c).is_file()) == []
    if shutil.which("git") and (ROOT / ".git").exists():  # here too, not only on a clean clone: none is ignored
        ignored = subprocess.run(["git", "check-ignore", *sorted(cited)], cwd=ROOT, capture_output=True, text=True)
        assert ignored.stdout.split() == []


def test_the_record_check_finds_a_citation():
    assert cited_records("from `results/a-b.jsonl` and results/c.jsonl, not results/d.json") == {
        "results/a-b.jsonl", "results/c.jsonl"}
