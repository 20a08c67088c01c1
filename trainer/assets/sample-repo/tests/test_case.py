import unittest

from tinytext.case import camel_case, snake_case, split_words, title_case


class CaseTest(unittest.TestCase):
    def test_split_camel(self):
        self.assertEqual(split_words("parseHTTPResponse"), ["parse", "http", "response"])

    def test_split_snake_and_spaces(self):
        self.assertEqual(split_words("hello_big world"), ["hello", "big", "world"])

    def test_snake_case(self):
        self.assertEqual(snake_case("HelloWorld"), "hello_world")

    def test_camel_case(self):
        self.assertEqual(camel_case("hello_world_again"), "helloWorldAgain")

    def test_camel_case_empty(self):
        self.assertEqual(camel_case(""), "")

    def test_title_case(self):
        self.assertEqual(title_case("some-kebab_name"), "Some Kebab Name")


if __name__ == "__main__":
    unittest.main()
