"""bench.moram_cost times one site's MoRAM delta, faithful and bounded, beside a ViT block (tiny sizes here)."""

from __future__ import annotations

from bench.moram_cost import site_cost


def test_site_cost_reports_every_form_at_every_task_count() -> None:
    rows = site_cost([1, 3], dim=16, tokens=5, batch=2, candidates=8, repeats=1)
    assert [(row["tasks"], row["atoms"]) for row in rows] == [(1, 16), (3, 48)]
    assert all(row[key] > 0 for row in rows for key in ("block_ms", "faithful_ms", "bounded_ms"))
