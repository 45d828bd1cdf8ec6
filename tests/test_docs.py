"""The README's benchmark table is the one `make bench` wrote (docs/bench/results.json), figure for figure."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_performance_table_matches_the_benchmark_results():
    results = json.loads((ROOT / "docs" / "bench" / "results.json").read_text())
    readme = (ROOT / "README.md").read_text()
    mc = results["mailchimp"]
    ours, delta, every, alt = (mc["ours"], mc["delta_after_1pct_change"], mc["delta_after_1pct_change_reading_every_row"],
                               mc["alternative_official_client_sequential"])
    runs = ", ".join(f"{w:.1f}" for w in ours["runs_wall_s"])
    rows = [
        f"| ideal: 2,000 calls / 10 connections × 300 ms | {mc['ideal_s']:.0f} s | 1.00× |",
        f"| **airflow-provider-segexport** (runs: {runs} s) | **{ours['wall_s']:.1f} s** | "
        f"{ours['ratio_to_ideal']:.2f}× | {ours['requests']:,} | {ours['cpu_us_per_profile']:.1f} µs | "
        f"{ours['peak_mb']} MB |",
        f"({delta['sent']:,} sent; runs {', '.join(f'{w:.1f}' for w in delta['runs_wall_s'])} s) | "
        f"**{delta['wall_s']:.1f} s** | **{100 * delta['share_of_full_time']:.1f} %** of full | {delta['requests']} | "
        f"{delta['cpu_us_per_profile']:.1f} µs |",
        f"every row read ({every['sent']:,} sent) | {every['wall_s']:.1f} s | "
        f"{100 * every['share_of_full_time']:.1f} % of full | {every['requests']} | {every['cpu_us_per_profile']:.1f} µs |",
        f"| official client, sequential ({alt['measured_profiles']:,} measured, ×10) | "
        f"{alt['wall_s_scaled_to_profiles']:.0f} s | {alt['wall_s_scaled_to_profiles'] / mc['ideal_s']:.1f}× |",
    ]
    missing = [row for row in rows if row not in readme]
    assert not missing, "README table differs from docs/bench/results.json; expected rows:\n" + "\n".join(missing)
    ref = results["machine"]["reference_loop_us_per_row"]
    assert f"took {ref['before']} µs per row before the exports and {ref['after']} after" in readme
