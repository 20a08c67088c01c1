import unittest

from tinytext import fill, wrap


class WrapTest(unittest.TestCase):
    def test_short_text_is_one_line(self):
        self.assertEqual(wrap("hello world", 20), ["hello world"])

    def test_breaks_between_words(self):
        self.assertEqual(wrap("the quick brown fox", 10), ["the quick", "brown fox"])

    def test_long_word_gets_own_line(self):
        self.assertEqual(wrap("a extraordinarily b", 5), ["a", "extraordinarily", "b"])

    def test_exact_width_fits(self):
        self.assertEqual(wrap("abc def", 7), ["abc def"])

    def test_empty_text(self):
        self.assertEqual(wrap("", 10), [])

    def test_bad_width(self):
        with self.assertRaises(ValueError):
            wrap("x", 0)

    def test_fill_joins_lines(self):
        self.assertEqual(fill("one two three", 7), "one two\nthree")

    def test_fill_keeps_paragraphs(self):
        text = "one two three\n\nfour five"
        self.assertEqual(fill(text, 7), "one two\nthree\n\nfour\nfive")

    def test_fill_drops_empty_paragraphs(self):
        self.assertEqual(fill("a\n\n\n\nb", 5), "a\n\nb")


if __name__ == "__main__":
    unittest.main()
