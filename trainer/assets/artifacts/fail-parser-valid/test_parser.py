import sys

lines = sys.stdin.read().splitlines()
print(f"parsed {len(lines)} lines")
