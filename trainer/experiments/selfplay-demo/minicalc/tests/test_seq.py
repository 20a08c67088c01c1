import unittest

from calc.seq import mean, total


class SeqTest(unittest.TestCase):
    def test_total(self):
        self.assertEqual(total([1, 2, 3]), 6)

    def test_mean(self):
        self.assertEqual(mean([1, 2, 3, 6]), 3)
