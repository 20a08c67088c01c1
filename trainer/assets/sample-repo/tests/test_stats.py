import unittest

from tinytext import stats


class StatsTest(unittest.TestCase):
    def test_words_are_lowercased(self):
        self.assertEqual(stats.words("The Cat sat"), ["the", "cat", "sat"])

    def test_word_count(self):
        self.assertEqual(stats.word_count("one, two; three!"), 3)

    def test_word_count_empty(self):
        self.assertEqual(stats.word_count("   "), 0)

    def test_top_words_order(self):
        text = "b a b c a b"
        self.assertEqual(stats.top_words(text, 2), [("b", 3), ("a", 2)])

    def test_top_words_ties_alphabetical(self):
        self.assertEqual(stats.top_words("z y x", 3), [("x", 1), ("y", 1), ("z", 1)])

    def test_average_word_length(self):
        self.assertAlmostEqual(stats.average_word_length("ab abcd"), 3.0)

    def test_average_word_length_empty(self):
        self.assertEqual(stats.average_word_length(""), 0.0)


if __name__ == "__main__":
    unittest.main()
