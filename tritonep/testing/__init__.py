"""Tools shared by tests, benchmarks and the demo job: process launcher, input generators, checks."""
