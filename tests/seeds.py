"""World seeds of the acceptance tests of scientific claims, distinct from every seed a doc figure used.

A figure measured and tuned on the docs' seeds (0, 7, 1000, 2000, 2024, 2025, 21, …) and then re-read by
a test on the same scenes proves nothing new. Every test that asserts a shapes-world claim draws its
scenes from these seeds instead; `tests/unit/test_seeds.py` fails when one of them appears in README.md
or docs/ (so no figure can be tuned on them without the suite saying so) or when a doc's seed is listed here.

Seeds are used in order: a test that needs one world takes ``TEST_SEEDS[0]``, one that needs two takes
the first two, and so on; a test that re-measures on independent worlds takes them from the end.
"""

from __future__ import annotations

TEST_SEEDS: tuple[int, ...] = (52711, 52712, 52713, 52714, 52715, 52716, 52717, 52718)
