"""Benchmarks behind `esvr bench`: ingest, label and simulation throughput, with their scripted fakes."""
