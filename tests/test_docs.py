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
    y = results["dynamics_campaign_sync"]
    inc = y["incremental_after_1pct_change"]
    rows += [
        f"| ideal: {y['calls']:,} creates through the gateway's bucket ({y['gateway_rate_limit']['requests']:,} at "
        f"once, then {y['gateway_rate_limit']['requests']:,} per {y['gateway_rate_limit']['period_s']:g} s) | "
        f"{y['ideal_s']:.0f} s | 1.00× | {y['calls']:,} | — | — |",
        f"| **airflow-provider-segexport** ({len(y['ours']['runs_wall_s'])} run, {y['max_in_flight']} calls in flight) "
        f"| **{y['ours']['wall_s']:.1f} s** | {y['ours']['ratio_to_ideal']:.2f}× | {y['ours']['requests']:,} | "
        f"{y['ours']['cpu_us_per_profile']:.0f} µs | {y['ours']['peak_mb']} MB |",
        f"| incremental run after {inc['changed']:,} contacts changed in Dynamics 365 ({inc['updated']:,} updated) | "
        f"**{inc['wall_s']:.1f} s** | **{100 * inc['share_of_full_time']:.1f} %** of full | {inc['requests']:,} |",
    ]
    missing = [row for row in rows if row not in readme]
    assert not missing, "README table differs from docs/bench/results.json; expected rows:\n" + "\n".join(missing)
    ref = results["mailchimp"]["reference_loop_us_per_row"]
    assert f"took {ref['before']} µs per row before the exports and {ref['after']} after" in readme
