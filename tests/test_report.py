"""The decision report, the rank card and the plain-words tables, on hand-made sweep folders."""
from __future__ import annotations

import io
import json
import re
import zipfile

import pandas as pd
import pytest

from core.evaluation import tables as T
from core.evaluation import wording as w
from core.evaluation.recommend import recommend_rank
from core.evaluation.report import REPORT_HTML, REPORT_MD, report_for_sweep, write_report
from core.rank_card import base_model_sources, load_snippet, rank_card_markdown
from tests import sweep_fixtures as F

RAW_COLUMNS = ("ref_nll", "ttft_ms", "ms_per_token", "adapter_mb", "rouge_l", "fact_recall", "_lo", "_hi", "None", "nan")
LONG_DECIMALS = re.compile(r"\d\.\d{4,}")


@pytest.fixture
def sweep(tmp_path):
    run, sw = tmp_path / "my-run", tmp_path / "my-sweep"
    run.mkdir()
    sw.mkdir()
    F.make_run(run, tmp_path / "train.jsonl")
    F.make_sweep(sw, run)
    return run, sw


def plain_text(markdown: str) -> str:
    """The words a reader sees: without the chart file names and the sweep's folder."""
    return re.sub(r"\(charts/\w+\.png\)|`[^`]*`", "", markdown)


def test_report_says_the_decision_in_words_with_rounded_numbers(sweep):
    run, sw = sweep
    report = report_for_sweep(sw)
    md = report.markdown
    assert report.rank == 2 and md.startswith("# Decision report: my-run")
    assert "**Use rank 2.** Rank 2 is within 2 % of the best rank (4) on reference loss, 2× smaller than rank 4 " \
           "and as fast when merged." in md
    assert "Verdict: as good as the best." in md and "difference within ±5 %, 95 % confidence" in md
    assert "All 4 measures agree: rank 2." in md
    assert md.count("\n### ") == 5 and "### e2 · What does the QB-100 cost?" in md     # degrades first
    assert "✓ €89" in md and "✗ €89" in md
    assert "4-bit NF4 (double quantization)" in md and "on **CPU**" in md and "full-precision" in md
    assert "40 examples (1 cut at the length limit)" in md and "alpha 16.0" in md
    text = plain_text(md)
    assert not [c for c in RAW_COLUMNS if c in text], [c for c in RAW_COLUMNS if c in text]
    assert not LONG_DECIMALS.search(text)


def test_report_html_is_one_file_with_the_charts_inside(sweep, tmp_path):
    report = report_for_sweep(sweep[1])
    assert set(report.charts) == {"quality.png", "speed.png", "memory.png"}
    assert all(data.startswith(b"\x89PNG") for data in report.charts.values())
    assert report.html.count("data:image/png;base64,") == 3 and "<table>" in report.html
    assert "<strong>Use rank 2.</strong>" in report.html and "charts/" not in report.html
    written = write_report(report, tmp_path / "out")
    assert {p.relative_to(tmp_path / "out").as_posix() for p in written} == {
        REPORT_MD, REPORT_HTML, "charts/quality.png", "charts/speed.png", "charts/memory.png"}
    names = zipfile.ZipFile(io.BytesIO(report.markdown_zip("r"))).namelist()
    assert "r/decision_report.md" in names and "r/charts/quality.png" in names


def test_report_for_a_hand_picked_rank_and_another_metric(sweep):
    report = report_for_sweep(sweep[1], metric="rouge_l", threshold=0.9, rank=4)
    assert report.rank == 4 and "Rank 4 was chosen by hand; the measurements recommend rank" in report.markdown
    assert "Decided on **word overlap**" in report.markdown and "within 10 % of the best rank" in report.markdown


def test_report_without_speed_says_so(tmp_path):
    run, sw = tmp_path / "r", tmp_path / "s"
    run.mkdir()
    sw.mkdir()
    F.make_run(run, tmp_path / "t.jsonl")
    F.make_sweep(sw, run, metrics=("rouge_l",))
    summary = pd.read_csv(sw / "summary.csv").drop(columns=["ms_per_token", "ms_per_token_merged"])
    summary.to_csv(sw / "summary.csv", index=False)
    report = report_for_sweep(sw)
    assert "speed.png" not in report.charts and "Speed was not measured in this sweep." in report.markdown
    assert "Decided on **word overlap**" in report.markdown and "reference loss was not measured" in report.markdown


# ------------------------------------------------------------------ tables and words


def test_degradation_table_has_words_not_none_or_negative_drops():
    from core import workspace_data as wd

    per = pd.DataFrame(F.per_prompt_rows())
    per.loc[(per["id"] == "e5") & (per["rank"] == 1), "ref_nll"] -= 0.5   # better at the lowest rank
    deg = wd.prompt_degradation(per, "ref_nll", 0.95)
    table = T.degradation_table(deg, "ref_nll")
    assert list(table.columns) == ["Prompt", "First falls short at", "At the highest rank", "At the lowest rank",
                                   "Base model", "Lowest vs highest rank"]
    first = table.iloc[0]
    assert first["Prompt"].startswith("e2 · ") and first["First falls short at"] == "rank 1"
    assert first["At the highest rank"] == "1.50 nats/token (rank 4)"
    cells = " ".join(table.astype(str).values.ravel())
    assert "None" not in cells and "nan" not in cells and "holds up at every rank" in cells
    assert "better" in table.set_index("Prompt").filter(like="e5", axis=0).iloc[0]["Lowest vs highest rank"]


def test_prompt_grid_marks_fact_hits_and_misses_and_filters():
    per = pd.DataFrame(F.per_prompt_rows())
    facts = T.facts_by_prompt(per)
    assert facts["e1"] == ["Ilse Varga", "2017"]
    cells, kinds = T.prompt_grid(per, "ref_nll", 0.95, facts)
    assert list(cells.columns) == ["Base model", "Rank 1", "Rank 2", "Rank 4"] and len(cells) == 8
    row = cells.index[0]
    assert cells.loc[row, "Rank 1"].endswith("✓ Ilse Varga · ✗ 2017") and kinds.loc[row, "Rank 1"] == "partial"
    assert kinds.loc[row, "Rank 4"] == "hit" and kinds.loc[row, "Base model"] == "miss"
    only, _ = T.prompt_grid(per, "ref_nll", 0.95, facts, only=["e3", "e2"])
    assert [i.split(" · ")[0] for i in only.index] == ["e3", "e2"]
    # Without facts a cell is marked when it falls short of the prompt's highest rank.
    _, plain = T.prompt_grid(per, "ref_nll", 0.95, {})
    assert plain.loc[cells.index[1], "Rank 1"] == "fails" and plain.loc[cells.index[1], "Rank 2"] == ""


def test_summary_table_and_sentences():
    per = F.per_prompt_rows()
    summary = pd.DataFrame(F.summary_rows(per))
    rec = recommend_rank(per)
    table = T.summary_table(summary, rec, ["ref_nll", "rouge_l"])
    assert table["Rank"].tolist() == ["Base model", "Rank 1", "Rank 2 ★", "Rank 4"]
    assert table.loc[2, "Verdict on reference loss"] == "as good as the best"
    assert table.loc[2, "Served merged, per token"] == "412 ms (380–450 ms)"
    assert table.loc[1, "With adapter on 4-bit base, per token"] == "3.3 s (3.1–3.6 s)"
    assert w.rank_sentence(summary, rec) == ("Rank 2 is within 2 % of the best rank (4) on reference loss, "
                                             "2× smaller than rank 4 and as fast when merged.")
    assert w.rank_sentence(summary, rec, 4) == ("Rank 4 is the best rank on reference loss.")
    assert w.ms(3300) == "3.3 s" and w.ms(8.25) == "8.2 ms" and w.mb(0.04) == "0.04 MB" and w.times(8) == "8×"
    assert w.memory_words(summary, 2).startswith("The 4-bit base model's weights take 166 MB and the rank-2 adapter "
                                                 "adds 0.28 MB. Merged into a full-precision copy")
    untimed = summary.drop(columns=["merged_mb"])
    words = w.memory_words(untimed, 2, quant="none")
    assert words.startswith("The full-precision base model's") and "merged copy" not in words


def test_across_metrics_words_name_the_disagreement():
    per = F.per_prompt_rows()
    for row in per:                       # word overlap: only rank 4 is good enough
        row["rouge_l"] = {0: 0.1, 1: 0.3, 2: 0.4, 4: 0.6}[row["rank"]]
    from core.evaluation.recommend import recommend_across_metrics

    recs = recommend_across_metrics(per, ["ref_nll", "rouge_l"])
    assert w.across_metrics_words(recs, "ref_nll") == (
        "1 of 2 measures agree on rank 2; word overlap picks rank 4. Rank 4 is the most cautious choice "
        "(the highest of the picks).")
    table = w.across_metrics_table(recs, "ref_nll")
    assert table["Agrees"].tolist() == ["✓", "✗"] and table["Measure"].iloc[0] == "Reference loss (decides)"


# ------------------------------------------------------------------ the rank card


def test_base_model_sources():
    assert base_model_sources({"path": "/cache/smol"}, "default") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "/cache/smol")
    assert base_model_sources({"path": "org/model"}, "org/model") == ("org/model", "org/model")
    assert base_model_sources({"path": "/models/mine"}, "/models/mine") == (None, "/models/mine")


def test_snippet_names_the_hub_id_with_the_local_path_as_fallback():
    code = load_snippet("demo-rank2", "HuggingFaceTB/SmolLM2-135M-Instruct", "/cache/smol")
    compile(code, "snippet", "exec")
    assert "BASE = 'HuggingFaceTB/SmolLM2-135M-Instruct'" in code and "LOCAL_BASE = '/cache/smol'" in code
    assert "ADAPTER = 'demo-rank2'" in code and "BitsAndBytesConfig" in code
    local = load_snippet("x", None, "/models/mine", nf4=False)
    compile(local, "snippet", "exec")
    assert "os.path" not in local and "BASE = '/models/mine'" in local and "BitsAndBytes" not in local


def test_rank_card_carries_the_report_numbers_rounded(sweep, tmp_path):
    run, sw = sweep
    folder = tmp_path / "export"
    folder.mkdir()
    F.make_export(folder, run, sw)
    card = json.loads((folder / "rank_card.json").read_text())
    md = rank_card_markdown(card)
    assert "| Reference loss | 1.48 (1.42–1.54) nats/token | 2.06 (2.00–2.13) nats/token |" in md
    assert "| Served merged, per token | 412 ms (380–450 ms) | 410 ms (380–450 ms) |" in md
    assert "measured on the 4-bit NF4 base" in md and "full-precision" in md
    assert "on the NF4 base model (compute float32, cpu)" in md
    assert "**The sweep's decision** (reference loss): Choose rank 2." in md
    assert md.count("PeftModel.from_pretrained") == 1
    assert "PeftModel" not in rank_card_markdown(card, with_snippet=False)
    assert not LONG_DECIMALS.search(md)
    report = report_for_sweep(sw)
    for number in ("1.48 (1.42–1.54) nats/token", "412 ms (380–450 ms)"):
        assert number in report.markdown                     # the same numbers, the same way


def test_report_command_writes_the_report_and_refuses_a_used_folder(sweep, tmp_path, cli_in_process):
    out = tmp_path / "report"
    code, err = cli_in_process("report", "--sweep", str(sweep[1]), "--out", str(out))
    assert code == 0, err
    assert "decision report: rank 2" in err
    assert (out / "decision_report.md").read_text().startswith("# Decision report: my-run")
    assert (out / "charts" / "quality.png").is_file() and (out / "decision_report.html").is_file()
    before = sorted(p.name for p in out.rglob("*"))
    code, err = cli_in_process("report", "--sweep", str(sweep[1]), "--out", str(out))
    assert code == 2 and "already holds files" in err and sorted(p.name for p in out.rglob("*")) == before
    code, err = cli_in_process("report", "--sweep", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r2"))
    assert code == 2 and "not a sweep folder" in err and not (tmp_path / "r2").exists()
    code, err = cli_in_process("report", "--sweep", str(sweep[1]), "--out", str(tmp_path / "r3"), "--threshold", "2")
    assert code == 2 and "--threshold" in err and not (tmp_path / "r3").exists()


def test_by_set_table_in_words():
    import pandas as pd

    from core.evaluation.tables import by_set_table

    by_set = pd.DataFrame([{"set": "FAQ recall", "rank": 0, "ref_nll": 3.912, "ref_nll_lo": 3.8, "ref_nll_hi": 4.0},
                           {"set": "FAQ recall", "rank": 4, "ref_nll": 1.2049, "ref_nll_lo": 1.1, "ref_nll_hi": 1.3},
                           {"set": "new wordings", "rank": 4, "ref_nll": 2.0, "ref_nll_lo": float("nan"), "ref_nll_hi": float("nan")}])
    table = by_set_table(by_set, "ref_nll")
    assert table.to_dict("records") == [
        {"Evaluation set": "FAQ recall", "Base model": "3.91 (3.80–4.00) nats/token", "Rank 4": "1.20 (1.10–1.30) nats/token"},
        {"Evaluation set": "new wordings", "Base model": "—", "Rank 4": "2.00 nats/token"}]
    assert by_set_table(by_set, "rouge_l") is None and by_set_table(None, "ref_nll") is None


def test_report_shows_each_named_evaluation_set(sweep):
    run, sw = sweep
    assert "on each named part of the evaluation" not in report_for_sweep(sw).markdown
    pd.DataFrame([{"set": name, "rank": b, "ref_nll": v, "ref_nll_lo": v - 0.1, "ref_nll_hi": v + 0.1}
                  for name, base in (("FAQ recall", 1.0), ("new wordings", 2.0)) for b, v in ((0, 4.0), (2, base))]
                 ).to_csv(sw / "summary_by_set.csv", index=False)
    md = report_for_sweep(sw).markdown
    assert "on each named part of the evaluation" in md
    assert "| FAQ recall | 4.00 (3.90–4.10) nats/token | 1.00 (0.90–1.10) nats/token |" in md
