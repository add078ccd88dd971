"""bench.moram_cost times one site's MoRAM delta, faithful and bounded, beside a ViT block (tiny sizes here)."""

from __future__ import annotations

from bench.moram_cost import model_cost, site_cost


def test_site_cost_reports_every_form_at_every_task_count() -> None:
    rows = site_cost([1, 3], dim=16, tokens=5, batch=2, candidates=8, repeats=1)
    assert [(row["tasks"], row["atoms"]) for row in rows] == [(1, 16), (3, 48)]
    assert all(row[key] > 0 for row in rows for key in ("block_ms", "faithful_ms", "bounded_ms"))


def test_model_cost_times_the_backbone_care_and_both_moram_forms() -> None:
    rows = model_cost("test_vit", [1], batch=1, image_size=32, candidates=8, repeats=1)
    assert rows[0]["tasks"] == 1
    assert all(rows[0][key] > 0 for key in ("backbone_ms", "care_fast_ms", "moram_faithful_ms", "moram_bounded_ms"))
