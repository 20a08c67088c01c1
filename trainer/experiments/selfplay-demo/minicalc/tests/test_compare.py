import unittest

from calc.compare import larger, smaller


class CompareTest(unittest.TestCase):
    def test_larger(self):
        self.assertEqual(larger(2, 7), 7)
        self.assertEqual(larger(9, 1), 9)

    def test_smaller(self):
        self.assertEqual(smaller(2, 7), 2)
        self.assertEqual(smaller(9, 1), 1)
