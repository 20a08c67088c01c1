import unittest

import tinytext


class PackageTest(unittest.TestCase):
    def test_exports(self):
        self.assertEqual(tinytext.word_count("a b"), 2)
        self.assertEqual(tinytext.snake_case("aB"), "a_b")
        self.assertEqual(tinytext.top_words("x x y", 1), [("x", 2)])
        self.assertEqual(tinytext.camel_case("a_b"), "aB")

    def test_all_names_exist(self):
        for name in tinytext.__all__:
            self.assertTrue(hasattr(tinytext, name), name)


if __name__ == "__main__":
    unittest.main()
