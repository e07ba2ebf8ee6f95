"""The comparison report: sections are replaced in place and the table aggregates seeds."""

from distnoisy.compare import markdown_table
from distnoisy.core.result_docs import replace_section


def test_replace_section_keeps_other_sections() -> None:
    doc = replace_section("# Results\n\nintro\n", "Symmetric", "table 1")
    doc = replace_section(doc, "Pair", "table 2")
    doc = replace_section(doc, "Symmetric", "table 1 (rerun)")
    assert doc == "# Results\n\nintro\n\n## Symmetric\n\ntable 1 (rerun)\n\n## Pair\n\ntable 2\n"


def test_markdown_table_mean_and_std() -> None:
    base = dict(
        dataset="digits",
        num_train=10,
        noise_kind="symmetric",
        noise_rate_realised=0.4,
        epochs=5,
        num_workers=1,
        best_test_acc=0.9,
        memorized=0.5,
        label_issue_auroc=0.8,
        wall_s=2.0,
    )
    results = {"ce": [dict(base, test_acc=0.70), dict(base, test_acc=0.80)]}
    table = markdown_table(results, "python -m distnoisy.compare")
    row = next(line for line in table.splitlines() if line.startswith("| ce |"))
    # No validation set: the val-selected column is n/a. Mean 75.0, sample std of (70, 80) = 7.07
    assert row.startswith("| ce | n/a | 75.0 ± 7.1 | 90.0 ± 0.0 | 50.0 ± 0.0 | 0.800 ± 0.000 |")
    # With one, the validation-selected test accuracy leads the row.
    selected = [
        dict(r, test_acc_at_best_val=v) for r, v in zip(results["ce"], (0.82, 0.84), strict=True)
    ]
    row = next(
        line
        for line in markdown_table({"ce": selected}, "cmd").splitlines()
        if line.startswith("| ce |")
    )
    assert row.startswith("| ce | 83.0 ± 1.4 | 75.0 ± 7.1 |")
    assert "2 seed(s)" in table
