"""`python -m producer.cli`: how `deepbatch run`, the tests and the benchmarks start the command (a worker,
above all) with the interpreter they run under."""

from producer.cli import main

main()
