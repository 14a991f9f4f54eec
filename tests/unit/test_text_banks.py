"""Text banks: the generated general bank, load_bank's validation and encode_bank's order and norms."""

from __future__ import annotations

import re
from importlib import resources

import pytest
import torch

from clip_lens import HookedCLIP, InputError
from clip_lens.banks import (
    CATEGORIES,
    PER_CATEGORY,
    TextBank,
    bank_categories,
    encode_bank,
    expand,
    generate_general_bank,
    load_bank,
)
from clip_lens.toy.texts import text_bank


@pytest.fixture(scope="module")
def general() -> list[str]:
    return generate_general_bank()


class TestGeneralBank:
    def test_size_and_distinct_case_insensitively(self, general):
        assert len(general) == 12 * PER_CATEGORY == 3504
        assert len({text.lower() for text in general}) == 3504

    def test_short_ascii_two_to_nine_words(self, general):
        assert max(len(text) for text in general) <= 60
        assert all(text.isascii() and 2 <= len(text.split()) <= 9 for text in general)
        assert all(text[0].isupper() or text[0].isdigit() or text[0] == '"' for text in general)

    def test_articles_agree_with_the_next_word(self, general):
        assert [t for t in general if re.search(r"\b[Aa] [aeiouAEIOU]", t)] == []
        assert [t for t in general if re.search(r"\b[Aa]n [^aeiouAEIOUX]", t)] == []  # "An X-ray image"
        assert "An object shaped like an octagon" in expand("An object shaped like a {shape}")

    def test_deterministic_and_seeded(self, general):
        assert generate_general_bank() == general
        other = generate_general_bank(seed=1)
        assert len(other) == 3504 and other != general

    def test_every_category_has_its_share(self):
        categories = bank_categories()
        assert list(categories) == CATEGORIES and len(CATEGORIES) == 12
        assert {name: len(texts) for name, texts in categories.items()} == {name: 292 for name in CATEGORIES}

    def test_templates_take_turns_within_a_category(self):
        text = bank_categories()["text"]
        letters = [t for t in text if t.startswith("The letter ")]
        assert len(letters) == 26  # a small template is used up, a large one does not crowd it out

    def test_shipped_file_equals_the_generator(self, general):
        shipped = resources.files("clip_lens").joinpath("data", "general_bank.txt").read_text(encoding="utf-8")
        assert shipped == "\n".join(general) + "\n"

    def test_examples_in_the_spirit_of_textspan(self, general):
        for text in ["A badge", "Photo taken in Paris", "An image with dogs", "A close-up of a leaf",
                     "Vibrant colors", "A striped pattern", "The letter Q", "A wooden chair"]:
            assert text in general


class TestLoadBank:
    def test_builtins(self, general):
        bank = load_bank("general")
        assert (bank.name, bank.source, len(bank)) == ("general", "builtin", 3504)
        assert bank.texts == general and bank.lines[:3] == [1, 2, 3]
        shapes = load_bank("shapes")
        assert shapes.texts == text_bank() and len(shapes) == len(text_bank()) > 100

    def test_file_strips_and_skips_comments_and_empty_lines(self, tmp_path):
        path = tmp_path / "mine.txt"
        path.write_text("# my bank\n  A red car \n\nA blue sky\n\n# end\nA dog\n", encoding="utf-8")
        bank = load_bank(path)
        assert bank.texts == ["A red car", "A blue sky", "A dog"]
        assert bank.lines == [2, 4, 7]
        assert (bank.name, bank.source) == ("mine", str(path))
        assert bank.report == {"skipped_empty": 2, "skipped_comments": 2}
        assert load_bank(str(path)).texts == bank.texts

    def test_list(self):
        bank = load_bank(["a cat", " a dog ", ""])
        assert (bank.texts, bank.source, bank.report) == (["a cat", "a dog"], "list", {"skipped_empty": 1})

    def test_unknown_name_lists_builtins_and_suggests(self):
        with pytest.raises(InputError, match=r"no bank named 'genral'; builtins: general, shapes, shapes-attributes; or give a path"
                           r" to a text file\. Did you mean: general\?"):
            load_bank("genral")

    def test_missing_file(self, tmp_path):
        with pytest.raises(InputError, match=r"nope\.txt' does not exist; give the path to a UTF-8 text file"):
            load_bank(tmp_path / "nope.txt")

    def test_folder_is_not_a_file(self, tmp_path):
        with pytest.raises(InputError, match="is not a file"):
            load_bank(tmp_path)

    def test_not_utf8_names_the_line(self, tmp_path):
        path = tmp_path / "latin1.txt"
        path.write_bytes("A cat\nA dog\nUn caf\xe9\n".encode("latin-1"))
        with pytest.raises(InputError, match=r"not UTF-8: byte 0xe9 on line 3 .*re-save the file as UTF-8"):
            load_bank(path)

    def test_empty_bank(self, tmp_path):
        path = tmp_path / "empty.txt"
        path.write_text("\n\n# only a comment\n", encoding="utf-8")
        with pytest.raises(InputError, match=r"has no texts \(2 empty lines\); put one text per line"):
            load_bank(path)
        with pytest.raises(InputError, match=r"bank 'list' has no texts \(0 empty items\)"):
            load_bank([])

    def test_too_long_names_lines_and_the_fix(self, tmp_path):
        path = tmp_path / "long.txt"
        path.write_text("short\n" + "x" * 30 + "\nok\n" + "y" * 41 + "\n", encoding="utf-8")
        with pytest.raises(InputError, match=r"2 texts longer than max_chars=20: line 2 \(30 chars\), line 4 "
                           r"\(41 chars\); shorten them or pass a larger max_chars"):
            load_bank(path, max_chars=20)
        assert len(load_bank(path, max_chars=41)) == 4

    def test_duplicates_name_lines_unless_deduped(self, tmp_path):
        path = tmp_path / "dup.txt"
        path.write_text("A cat\nA dog\nA cat\na cat\n\nA dog\n", encoding="utf-8")
        with pytest.raises(InputError, match=r"2 duplicate texts: line 3 repeats line 1 \('A cat'\), line 6 repeats"
                           r" line 2 \('A dog'\); remove them or pass dedupe=True"):
            load_bank(path)
        bank = load_bank(path, dedupe=True)
        assert bank.texts == ["A cat", "A dog", "a cat"] and bank.lines == [1, 2, 4]
        assert bank.report["duplicates_removed"] == [
            {"line": 3, "duplicate_of": 1, "text": "A cat"},
            {"line": 6, "duplicate_of": 2, "text": "A dog"},
        ]
        assert bank.report["skipped_empty"] == 1

    def test_non_strings(self):
        with pytest.raises(InputError, match="got int at position 2"):
            load_bank(["a cat", 3])
        with pytest.raises(InputError, match="got int"):
            load_bank(7)


class FakeModel:
    """Token 'ids' are the texts' positions in a fixed table; embeddings are known, unnormalised vectors."""

    table = {"a": [3.0, 4.0], "b": [0.0, -2.0], "c": [1.0, 1.0], "d": [-5.0, 0.0], "e": [0.0, 0.5]}

    def __init__(self):
        self.batches = []

    def to_tokens(self, texts):
        if any(len(t) > 3 for t in texts):
            too_long = next(i for i, t in enumerate(texts) if len(t) > 3)
            raise InputError(f"text {too_long} is too long.")
        self.batches.append(list(texts))
        return torch.tensor([list(self.table).index(t) if t in self.table else -1 for t in texts])

    def encode_text(self, tokens, normalize=False):
        out = torch.tensor([list(self.table.values())[i] for i in tokens.tolist()])
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out


class TestEncodeBank:
    def test_normalised_in_order_in_batches(self):
        model = FakeModel()
        out = encode_bank(model, load_bank(["c", "a", "e", "d", "b"]), batch_size=2)
        expected = torch.tensor([[0.7071068, 0.7071068], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
        assert torch.allclose(out, expected, atol=1e-6)
        assert model.batches == [["c", "a"], ["e", "d"], ["b"]]

    def test_untokenizable_text_names_its_line(self, tmp_path):
        path = tmp_path / "bank.txt"
        path.write_text("a\nb\n\nc\ntoo long\n", encoding="utf-8")
        with pytest.raises(InputError, match=r"line 5 of .*bank\.txt cannot be tokenized for this model: text 0 is"
                           r" too long\. Shorten or rephrase it"):
            encode_bank(FakeModel(), load_bank(path), batch_size=2)
        with pytest.raises(InputError, match=r"text 3 of bank 'list' cannot be tokenized"):
            encode_bank(FakeModel(), TextBank("list", ["a", "b", "long"], "list"))

    @pytest.mark.slow  # long; the default suite stays under 5 minutes
    def test_toy_model_on_the_shapes_bank(self):
        model = HookedCLIP.from_pretrained("toy-shapes")
        bank = load_bank("shapes")
        out = encode_bank(model, bank, batch_size=100)
        assert out.shape == (len(bank), 128) and out.device == model.device
        assert torch.allclose(out.norm(dim=-1), torch.ones(len(bank)), atol=1e-5)
        single = model.encode_text(model.to_tokens(bank.texts[:3]), normalize=True)
        assert torch.allclose(out[:3], single, atol=1e-5)

    def test_toy_model_names_a_text_too_long_for_its_context(self):
        model = HookedCLIP.from_pretrained("toy-shapes")
        bank = load_bank(["a red circle", " ".join(["red"] * 40)])
        with pytest.raises(InputError, match=r"text 2 of bank 'list' cannot be tokenized for this model: text 0 has"
                           r" 40 words; at most 30 fit"):
            encode_bank(model, bank)


def test_shapes_attributes_bank_names_one_attribute_per_world_text():
    from clip_lens.toy.texts import DESCRIPTORS, DISTRACTORS
    from clip_lens.toy.world import ATTRIBUTES, VALUES, attribute_prompt

    bank = load_bank("shapes-attributes")
    prompts = {attribute_prompt(a, v) for a in ATTRIBUTES for v in VALUES[a]}
    descriptors = {f"something with {d}" for values in DESCRIPTORS.values() for d in values}
    assert set(bank.texts) == prompts | descriptors | set(DISTRACTORS)
    assert set(bank.texts) < set(load_bank("shapes").texts)
