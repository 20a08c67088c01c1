def total(xs):
    return sum(xs)


def mean(xs):
    return sum(xs) / len(xs)
