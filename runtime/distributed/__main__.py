"""`python -m passlab.runtime.distributed DIR`: one rank of a spawned run (see launch.py)."""
import sys

from .launch import worker_main

worker_main(sys.argv[1])
