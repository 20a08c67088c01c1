import unittest

from calc.text import shout, whisper


class TextTest(unittest.TestCase):
    def test_shout(self):
        self.assertEqual(shout("hi"), "HI!")

    def test_whisper(self):
        self.assertEqual(whisper("Hey"), "hey...")
