"""Tools that run the product from outside, for the tests and the benchmarks; never served."""
