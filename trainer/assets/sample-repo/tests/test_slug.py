import unittest

from tinytext import slugify


class SlugTest(unittest.TestCase):
    def test_simple(self):
        self.assertEqual(slugify("Hello World"), "hello-world")

    def test_punctuation_is_dropped(self):
        self.assertEqual(slugify("Rust, Python & Go!"), "rust-python-go")

    def test_accents_are_folded(self):
        self.assertEqual(slugify("Crème brûlée"), "creme-brulee")

    def test_custom_separator(self):
        self.assertEqual(slugify("a b c", separator="_"), "a_b_c")

    def test_max_length_keeps_whole_words(self):
        self.assertEqual(slugify("The quick brown fox", max_length=15), "the-quick-brown")

    def test_max_length_cuts_a_long_first_word(self):
        self.assertEqual(slugify("Supercalifragilistic", max_length=5), "super")


if __name__ == "__main__":
    unittest.main()
