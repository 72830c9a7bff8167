"""The speed targets of the GPU campaign (issue #15), judged from the benchmarks' JSON in one folder.

Each target is reached, missed, or not measured (its result file or entry is absent, or the measurement failed),
always with the figure it was judged on. The sizes are the largest and smallest the run measured, so a smoke run
on a CPU is judged the same way, at its own sizes.
"""

from __future__ import annotations

import json
from pathlib import Path


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def _ms(entry: dict | None, key: str) -> float | None:
    value = (entry or {}).get(key) or {}
    return value.get("median_ms")


def _target(name: str, figure: str | None, reached: bool | None) -> dict:
    verdict = "not measured" if reached is None else "reached" if reached else "missed"
    return {"name": name, "verdict": verdict, "figure": figure or "no measurement"}


def core_targets(core: dict | None) -> list[dict]:
    steps = sorted((core or {}).get("steps", []), key=lambda e: e["context"])
    forwards = sorted((core or {}).get("forward", []), key=lambda e: e["length"])
    targets = []
    longest, shortest = (steps[-1], steps[0]) if steps else (None, None)
    ours, reference = _ms(longest, "ours_batch1"), _ms(longest, "reference_batch1")
    targets.append(_target(
        "decode step >= 20x the reference's cached step (longest context, batch 1)",
        ours and reference and f"{reference / ours:.1f}x at {longest['context']:,} ({ours:.2f} ms vs {reference:.2f} ms)",
        None if not (ours and reference) else reference / ours >= 20))
    first = _ms(shortest, "ours_batch1")
    targets.append(_target(
        "step(longest) <= 1.3 x step(shortest)",
        ours and first and f"{ours / first:.2f}x ({shortest['context']:,}: {first:.2f} ms, "
                           f"{longest['context']:,}: {ours:.2f} ms)",
        None if not (ours and first) else ours / first <= 1.3))
    batches = sorted(int(k.removeprefix("ours_batch")) for k in (longest or {})
                     if k.startswith("ours_batch") and k.removeprefix("ours_batch").isdigit())
    widest = batches[-1] if batches else None
    many = _ms(longest, f"ours_batch{widest}") if widest else None
    rate = widest * 1e3 / many if many else None
    targets.append(_target(
        "aggregate decode >= 30,000 tokens/s at 64 streams with 64K contexts",
        rate and f"{rate:,.0f} tokens/s at batch {widest}, context {longest['context']:,}",
        None if rate is None or widest < 64 else rate >= 30000))
    compared = [e for e in forwards if _ms(e, "ours") and _ms(e, "reference")]
    if compared:
        entry = compared[-1]
        time_ratio = _ms(entry, "ours") / _ms(entry, "reference")
        memory = (entry["ours"].get("peak_mib"), entry["reference"].get("peak_mib"))
        memory_ratio = memory[0] / memory[1] if all(memory) else None
        figure = f"{time_ratio:.2f} of the time" + (f", {memory_ratio:.2f} of the memory" if memory_ratio else "")
        targets.append(_target(f"full forward <= 1/5 of the reference's time and <= 1/4 of its memory "
                               f"({entry['length']:,} tokens)", figure,
                               time_ratio <= 0.2 and (memory_ratio is None or memory_ratio <= 0.25)))
    else:
        targets.append(_target("full forward <= 1/5 of the reference's time and <= 1/4 of its memory", None, None))
    alone = [e for e in forwards if _ms(e, "ours") and not _ms(e, "reference")]
    if alone:
        entry = alone[-1]
        ms, mib = _ms(entry, "ours"), entry["ours"].get("peak_mib")
        figure = f"{ms / 1e3:.2f} s" + (f", {mib / 1024:.1f} GiB" if mib is not None else "")
        targets.append(_target(f"a 1M-token forward <= 0.5 s and <= 16 GB ({entry['length']:,} tokens)", figure,
                               None if entry["length"] < 1 << 20 else ms <= 500 and (mib or 0) <= 16 * 1024))
    else:
        targets.append(_target("a 1M-token forward <= 0.5 s and <= 16 GB", None, None))
    return targets


def server_targets(server: dict | None) -> list[dict]:
    entries = [e for e in (server or {}).get("streams", []) if e["streams"] == 1 and "streamed" in e]
    if not entries:
        return [_target("streamed over HTTP within 10% of the engine alone at one stream", None, None)]
    entry = min(entries, key=lambda e: e.get("prompt_tokens", 0))
    share = entry["streamed"]["tokens_per_second"] / entry["engine"]["tokens_per_second"]
    return [_target("streamed over HTTP within 10% of the engine alone at one stream",
                    f"{share:.2f} of the engine's tokens/s ({entry['streamed']['tokens_per_second']:.0f} vs "
                    f"{entry['engine']['tokens_per_second']:.0f})", share >= 0.9)]


def evaluate_targets(folder: Path, device: str) -> list[dict]:
    return core_targets(_load(folder, f"core-{device}.json")) + server_targets(_load(folder, f"server-{device}.json"))
