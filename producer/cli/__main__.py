"""`python -m producer.cli`: how `deepbatch run`, the tests and the benchmarks start the command (a worker,
above all) with the interpreter they run under. Guarded: a worker's engine process, spawned, imports this
module again as `__mp_main__` and must not run the command a second time."""

from producer.cli import main

if __name__ == "__main__":
    main()
