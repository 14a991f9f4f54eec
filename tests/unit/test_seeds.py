"""The claim tests' world seeds (`tests/seeds.py`) are seeds no doc figure used, and the claim tests use them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.seeds import TEST_SEEDS

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "docs").rglob("*.py"))]
# the acceptance tests of shapes-world claims: each draws its scenes from TEST_SEEDS
CLAIM_TESTS = [
    "tests/acceptance/test_toy_model.py",
    "tests/acceptance/test_patching_truth.py",
    "tests/acceptance/test_sae_truth.py",
    "tests/acceptance/test_shapes_world_claims.py",
    "tests/plugins/test_text_neighbours_truth.py",
    "tests/plugins/test_mk_analysis.py",
    "tests/plugins/test_mk_descriptors.py",
    "tests/plugins/test_mk_evaluation.py",
    "tests/plugins/test_mk_regions.py",
    "tests/plugins/test_segmentation.py",
    "tests/acceptance/test_neurons_truth.py",
]
# a world seed written as a literal in a test: ShapesWorld(seed=7), binding_accuracy(model, seed=1001), eval_seed=5
WORLD_SEED_LITERALS = [
    r"ShapesWorld\(\s*seed\s*=\s*(\d+)",
    r"(?:shapes_world_images|zero_shot_accuracy|binding_accuracy|localisation|shapes_world_ground_truth)\([^)]*?\bseed\s*=\s*(\d+)",
    r"\w+_seed\s*=\s*(\d+)",
]
# "seed 1000", "seed=7", "--eval-seed 2000", "seeds 31101–31105", "seeds (31977, 31978)", "SEED = 2024"
SEED_MENTION = re.compile(r"(?i)seeds?\s*[=:(]?\s*((?:\d+(?:\s*(?:,|–|-|\.\.|and)\s*(?=\d))?)+)")


def seeds_in(text: str) -> set[int]:
    """Every integer named as a seed in ``text`` (ranges ``a–b`` expanded)."""
    found: set[int] = set()
    for match in SEED_MENTION.finditer(text):
        numbers = re.findall(r"\d+|–|-|\.\.", match.group(1))
        for i, token in enumerate(numbers):
            if token.isdigit():
                found.add(int(token))
            elif 0 < i < len(numbers) - 1 and int(numbers[i + 1]) - int(numbers[i - 1]) < 1000:
                found.update(range(int(numbers[i - 1]), int(numbers[i + 1]) + 1))
    return found


def test_seed_mentions_are_read_with_lists_and_ranges():
    text = "world seed 1000, n=5; seeds 31101–31105 and seeds (31977, 31978); --eval-seed 2000; SEED = 2024; seed=7."
    assert seeds_in(text) == {1000, *range(31101, 31106), 31977, 31978, 2000, 2024, 7}


def test_test_seeds_are_distinct_and_many_enough_for_independent_worlds():
    assert len(set(TEST_SEEDS)) == len(TEST_SEEDS) >= 4


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_test_seed_appears_in_the_docs(path):
    """No doc names a test seed, as a seed or as any number: a figure measured on it would be re-read, not tested."""
    text = path.read_text(encoding="utf-8")
    named = {s for s in TEST_SEEDS if re.search(rf"(?<![\d.]){s}(?![\d])", text)}
    assert not named, f"{path.relative_to(ROOT)} names test seeds {sorted(named)}: measure doc figures on other seeds"


def test_claim_tests_draw_their_worlds_from_test_seeds_and_never_from_a_doc_seed():
    doc_seeds = set().union(*(seeds_in(p.read_text(encoding="utf-8")) for p in DOCS))
    assert {0, 7, 1000, 2024} <= doc_seeds  # the parser still finds the docs' seeds
    for name in CLAIM_TESTS:
        source = (ROOT / name).read_text(encoding="utf-8")
        assert "TEST_SEEDS" in source, name
        literal = {int(s) for pattern in WORLD_SEED_LITERALS for s in re.findall(pattern, source)}
        assert not literal & doc_seeds, f"{name} uses doc seeds {sorted(literal & doc_seeds)}; take them from tests.seeds.TEST_SEEDS"
