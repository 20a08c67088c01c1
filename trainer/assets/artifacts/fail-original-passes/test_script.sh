#!/usr/bin/env bash
python3 -m unittest -v tests.test_package.PackageTest.test_exports 2>&1
