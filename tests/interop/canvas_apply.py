"""Python stand-in for ``celeriac apply --canvas JSON`` (used when INTEROP_WORKER=python).

    python canvas_apply.py --canvas '<signature JSON>'

Rebuilds the signature dict (``json.dumps(chain(...))`` and the like) with
Celery's own ``signature()``, applies it with pyapp's configuration (the
INTEROP_* environment, default queue ``INTEROP_QUEUE``) and prints the id of
the task holding the canvas's final result: the last task of a chain, the body
of a chord, the task itself; for a group the group id, then each member's id
on a line of its own.
"""
import argparse
import json

from celery import signature
from celery.result import GroupResult

from pyapp import app


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canvas", required=True, help="a Celery signature as JSON")
    options = parser.parse_args()
    result = signature(json.loads(options.canvas), app=app).apply_async()
    lines = [result.id]
    if isinstance(result, GroupResult):
        lines.extend(member.id for member in result.results)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
